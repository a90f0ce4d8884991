//! The API's HTTP/1.1 parser from a hostile local client: any bytes, cut
//! into any pieces. Parsing the stream in pieces must give the same
//! requests (and the same first error) as parsing it whole, every request
//! must respect the body limit, and every request and error must turn into
//! a well-formed answer.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm::api::http::{write_response, HttpError, Parsed, Request, RequestParser};
use vmm::api::routes;
use vmm::api::types::ApiResponse;

#[derive(Arbitrary, Debug)]
struct Input {
    max_payload: u16,
    cuts: Vec<u16>,
    data: Vec<u8>,
}

/// Pulls every request the parser can give; true once it failed.
fn drain(
    parser: &mut RequestParser,
    out: &mut Vec<Result<Request, HttpError>>,
    max_payload: usize,
) -> bool {
    loop {
        match parser.next_request() {
            Ok(Some(Parsed::Request(r))) => {
                assert!(r.body.len() <= max_payload, "body over the limit");
                assert!(r.path.starts_with('/'), "path {:?}", r.path);
                out.push(Ok(r));
            }
            Ok(Some(Parsed::SendContinue)) => {}
            Ok(None) => return false,
            Err(e) => {
                out.push(Err(e));
                return true;
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let max_payload = usize::from(input.max_payload);

    let mut whole = RequestParser::new(max_payload);
    whole.push(&input.data);
    let mut all = Vec::new();
    drain(&mut whole, &mut all, max_payload);

    let mut parser = RequestParser::new(max_payload);
    let mut pieces = Vec::new();
    let mut rest = &input.data[..];
    let mut cuts = input.cuts.iter();
    while !rest.is_empty() {
        let n = cuts
            .next()
            .map_or(rest.len(), |&c| usize::from(c) % (rest.len() + 1));
        let (now, later) = rest.split_at(n);
        rest = later;
        parser.push(now);
        if drain(&mut parser, &mut pieces, max_payload) {
            break;
        }
        // The server stops reading once this much is buffered.
        if parser.buffered() >= parser.buffer_limit() {
            break;
        }
    }
    let n = pieces.len().min(all.len());
    assert_eq!(pieces[..n], all[..n], "pieces and whole disagree");
    if pieces.len() > n {
        panic!("piecewise parsing found more: {:?}", &pieces[n..]);
    }

    // What the API thread answers: the router's answer for a request, the
    // parser's error otherwise; both must frame as HTTP.
    for item in &all {
        let answer = match item {
            Ok(r) => match routes::parse(&r.method, &r.path, &r.body) {
                Ok(_) => ApiResponse::no_content(),
                Err(e) => e.into(),
            },
            Err(e) => ApiResponse::fault(e.status(), e.to_string()),
        };
        let mut out = Vec::new();
        write_response(&mut out, answer.status, answer.body.as_deref(), true);
        assert!(out.starts_with(b"HTTP/1.1 "));
        let mut check = RequestParser::new(0);
        check.push(&out);
    }
});
