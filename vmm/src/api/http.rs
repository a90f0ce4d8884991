//! A small, strict HTTP/1.1 request parser and response writer for the API
//! socket.
//!
//! Why hand-written: the crates that parse and serve HTTP (hyper, axum,
//! actix, and `micro-http` 0.3 on crates.io, which is an unrelated
//! tokio-based server, not Firecracker's) pull in an async runtime, and
//! the API thread is one epoll loop with a handful of sockets.
//! Firecracker's own `micro_http` is not published on crates.io as a
//! maintained crate (`cargo info micro_http` finds only the unrelated
//! tokio server; `dbs-uhttp` is a fork that brings `mio` and its own
//! epoll loop). The subset the API needs is small: `Content-Length`
//! bodies only, no chunking, no upgrades, one request in flight per
//! connection.
//!
//! The parser is incremental: bytes are [`RequestParser::push`]ed as they
//! arrive, in pieces of any size, and [`RequestParser::next_request`]
//! yields whole requests (several may be buffered: pipelining). Memory is
//! bounded: the header section by [`MAX_HEADER_BYTES`], a body by the
//! configured maximum payload, and a body that would exceed it is refused
//! as soon as its `Content-Length` is read, without reading it.

use std::fmt;

/// Upper bound on the request line plus headers (and the blank line that
/// ends them). Firecracker's clients send a few hundred bytes.
pub const MAX_HEADER_BYTES: usize = 8192;

/// Default body limit, as Firecracker's `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// The request methods the API distinguishes; anything else is carried as
/// text so the router can name it in its error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`: read a resource; must not carry a body.
    Get,
    /// `PUT`: create or replace a resource.
    Put,
    /// `PATCH`: update part of a resource.
    Patch,
    /// Any other syntactically valid method token.
    Other(String),
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Other(m) => m,
        })
    }
}

/// One complete request, as the router sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The absolute path, without query string (`/drives/rootfs`).
    pub path: String,
    /// The body; empty when the request had none (`Content-Length` absent
    /// or zero), which is how the router tells "no body" from a body.
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept open after the
    /// response (HTTP/1.1 default, or `Connection: keep-alive` on 1.0).
    pub keep_alive: bool,
}

/// What the parser produced from the bytes buffered so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request.
    Request(Request),
    /// The client sent `Expect: 100-continue` and waits for an interim
    /// `100 Continue` before sending the body: write
    /// [`write_continue`] and keep feeding the parser.
    SendContinue,
}

/// A request the parser refuses. Each one is answered with
/// [`HttpError::status`] and its message as `fault_message`, and the
/// connection is closed (the parser cannot find the next request's start).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No blank line within [`MAX_HEADER_BYTES`].
    #[error("Request header section is larger than the limit of {0} bytes.")]
    HeaderTooLarge(usize),
    /// The request line is not `METHOD SP /path SP HTTP/1.x`.
    #[error("Invalid request line: {0}.")]
    RequestLine(&'static str),
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("Unsupported HTTP version: {0}.")]
    Version(String),
    /// A header line that does not parse.
    #[error("Invalid header: {0}.")]
    Header(String),
    /// Lines must end in CRLF.
    #[error("Invalid header: lines must end with CRLF, found a bare LF.")]
    BareLf,
    /// `Content-Length` is not a single decimal number.
    #[error("Invalid header: bad Content-Length value {0:?}.")]
    ContentLength(String),
    /// A transfer coding other than `identity` (e.g. `chunked`).
    #[error("Invalid header: Transfer-Encoding {0:?} is not supported; send the body with a Content-Length.")]
    TransferEncoding(String),
    /// An `Expect` other than `100-continue`.
    #[error("Unsupported Expect header value {0:?}.")]
    Expect(String),
    /// The body would be larger than the configured limit; wording as
    /// Firecracker's, so clients that match on it keep working.
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} allowed by server."
    )]
    PayloadTooLarge {
        /// The announced `Content-Length`, as sent (it may not fit a u64).
        size: String,
        /// The configured maximum.
        limit: usize,
    },
    /// The client closed its side in the middle of a request.
    #[error("The connection was closed before a complete request was received.")]
    Truncated,
}

impl HttpError {
    /// The status code the error is answered with. Firecracker answers
    /// every malformed request, an oversized one included, with 400; an
    /// unknown expectation gets the status RFC 9110 assigns it.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Expect(_) => 417,
            _ => 400,
        }
    }
}

/// A request whose header section has been parsed and whose body is
/// still arriving.
#[derive(Debug)]
struct Head {
    method: Method,
    path: String,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

/// Incremental request parser for one connection.
#[derive(Debug)]
pub struct RequestParser {
    max_payload: usize,
    /// Bytes received and not yet consumed by a returned request.
    buf: Vec<u8>,
    /// How far `buf` has been searched for the end of the header section,
    /// so a header arriving byte by byte is not rescanned from the start.
    scanned: usize,
    /// The current request's head once its header section is complete.
    head: Option<Head>,
    continue_sent: bool,
}

impl RequestParser {
    /// A parser that refuses bodies larger than `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            buf: Vec::new(),
            scanned: 0,
            head: None,
            continue_sent: false,
        }
    }

    /// The most bytes the parser ever needs buffered to make progress: a
    /// full header section and a full body. The connection stops reading
    /// when this much is buffered, which bounds its memory.
    pub fn buffer_limit(&self) -> usize {
        MAX_HEADER_BYTES.saturating_add(self.max_payload)
    }

    /// Bytes received and not yet returned as part of a request.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether part of a request has arrived: at end of input this means
    /// the client hung up mid-request.
    pub fn in_request(&self) -> bool {
        self.head.is_some() || self.buf.iter().any(|&b| b != b'\r' && b != b'\n')
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next request if it has fully arrived, `Ok(None)` if more
    /// bytes are needed. After an error the connection must be closed.
    pub fn next_request(&mut self) -> Result<Option<Parsed>, HttpError> {
        if self.head.is_none() {
            let Some(head) = self.parse_head()? else {
                return Ok(None);
            };
            self.head = Some(head);
            self.continue_sent = false;
        }
        let Some(head) = &self.head else {
            return Ok(None);
        };
        if self.buf.len() >= head.content_length {
            let body: Vec<u8> = self.buf.drain(..head.content_length).collect();
            let Some(head) = self.head.take() else {
                return Ok(None);
            };
            return Ok(Some(Parsed::Request(Request {
                method: head.method,
                path: head.path,
                body,
                keep_alive: head.keep_alive,
            })));
        }
        if head.expect_continue && !self.continue_sent {
            self.continue_sent = true;
            return Ok(Some(Parsed::SendContinue));
        }
        Ok(None)
    }

    /// Finds and parses a complete header section at the start of `buf`.
    fn parse_head(&mut self) -> Result<Option<Head>, HttpError> {
        // RFC 9112 §2.2: ignore empty lines before a request line (some
        // clients send CRLF after a body).
        let blank = self
            .buf
            .chunks_exact(2)
            .take_while(|pair| *pair == b"\r\n")
            .count();
        if blank > 0 {
            self.buf.drain(..blank * 2);
            self.scanned = self.scanned.saturating_sub(blank * 2);
        }
        let window = self.buf.len().min(MAX_HEADER_BYTES);
        let from = self.scanned.saturating_sub(3);
        let end = match find_head_end(&self.buf[..window], from) {
            Some(HeadEnd::Crlf(end)) => end,
            Some(HeadEnd::BareLf) => return Err(HttpError::BareLf),
            None => {
                if self.buf.len() >= MAX_HEADER_BYTES {
                    return Err(HttpError::HeaderTooLarge(MAX_HEADER_BYTES));
                }
                self.scanned = window;
                return Ok(None);
            }
        };
        let head = parse_head_bytes(&self.buf[..end], self.max_payload)?;
        self.buf.drain(..end + 4);
        self.scanned = 0;
        Ok(Some(head))
    }
}

enum HeadEnd {
    /// Index of the `\r\n\r\n` that ends the header section.
    Crlf(usize),
    BareLf,
}

/// Searches `buf[from..]` for the end of the header section, refusing a
/// bare LF anywhere before it (an LF not preceded by CR).
fn find_head_end(buf: &[u8], from: usize) -> Option<HeadEnd> {
    for i in from..buf.len() {
        if buf[i] != b'\n' {
            continue;
        }
        if i == 0 || buf[i - 1] != b'\r' {
            return Some(HeadEnd::BareLf);
        }
        if i >= 3 && &buf[i - 3..=i] == b"\r\n\r\n" {
            return Some(HeadEnd::Crlf(i - 3));
        }
    }
    None
}

/// RFC 9110 `tchar`: the characters allowed in a method or header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses the request line and headers (`bytes` has no final CRLF CRLF).
fn parse_head_bytes(bytes: &[u8], max_payload: usize) -> Result<Head, HttpError> {
    let mut lines = bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let (method, path, http10) = parse_request_line(request_line)?;

    let mut content_length: Option<String> = None;
    let mut keep_alive = !http10;
    let mut expect_continue = false;
    for line in lines {
        if line.contains(&b'\r') {
            return Err(HttpError::Header("stray CR in a header line".into()));
        }
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(HttpError::Header(
                "obsolete line folding is not allowed".into(),
            ));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(HttpError::Header("a header line has no colon".into()));
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(HttpError::Header("bad header name".into()));
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(HttpError::Header(
                "control character in a header value".into(),
            ));
        }
        let value = String::from_utf8_lossy(value);
        let value = value.trim_matches([' ', '\t']);
        // Header names are ASCII (tchar), so this cannot fail.
        let name = std::str::from_utf8(name).unwrap_or_default();
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::Header("repeated Content-Length".into()));
            }
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::ContentLength(value.to_string()));
            }
            content_length = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("identity") {
                return Err(HttpError::TransferEncoding(value.to_string()));
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Err(HttpError::Expect(value.to_string()));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(|o| o.trim_matches([' ', '\t'])) {
                if option.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    // Digits only, so a parse failure is an overflow: too large as well.
    let content_length = match content_length.as_deref().map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= max_payload => n,
        Some(_) => {
            return Err(HttpError::PayloadTooLarge {
                size: content_length.unwrap_or_default(),
                limit: max_payload,
            })
        }
    };
    Ok(Head {
        method,
        path,
        content_length,
        keep_alive,
        // Nothing to wait for without a body.
        expect_continue: expect_continue && content_length > 0,
    })
}

/// Parses `METHOD SP request-target SP HTTP-version`; returns the method,
/// the path and whether the version is 1.0.
fn parse_request_line(line: &[u8]) -> Result<(Method, String, bool), HttpError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine(
            "expected METHOD, path and version separated by single spaces",
        ));
    };
    if method.is_empty() || method.len() > 32 || !method.iter().all(|&b| is_tchar(b)) {
        return Err(HttpError::RequestLine("bad method"));
    }
    let method = match method {
        b"GET" => Method::Get,
        b"PUT" => Method::Put,
        b"PATCH" => Method::Patch,
        other => Method::Other(String::from_utf8_lossy(other).into_owned()),
    };
    if !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(HttpError::RequestLine("bad characters in the path"));
    }
    let target = String::from_utf8_lossy(target);
    // Absolute form (`http://localhost/path`) as some proxies and clients
    // send it; the authority means nothing on a Unix socket.
    let target = match target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("HTTP://"))
    {
        Some(rest) => match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        },
        None => &target[..],
    };
    if !target.starts_with('/') {
        return Err(HttpError::RequestLine("the path must start with '/'"));
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        other => {
            return Err(HttpError::Version(
                String::from_utf8_lossy(other).into_owned(),
            ))
        }
    };
    Ok((method, path, http10))
}

/// The reason phrase for the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Appends the interim response an `Expect: 100-continue` client waits
/// for.
pub fn write_continue(out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
}

/// Appends a response. A 204 carries no body and no body headers (RFC
/// 9110 §15.3.5); anything else gets `Content-Length` and, with a body,
/// `Content-Type: application/json`. `keep_alive` false adds
/// `Connection: close`, after which the server closes the connection.
pub fn write_response(out: &mut Vec<u8>, status: u16, body: Option<&str>, keep_alive: bool) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: ringvm API\r\n",
        reason(status)
    );
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n"
    } else {
        b"Connection: close\r\n"
    });
    if status != 204 {
        let body = body.unwrap_or("");
        if !body.is_empty() {
            out.extend_from_slice(b"Content-Type: application/json\r\n");
        }
        let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
        out.extend_from_slice(body.as_bytes());
    } else {
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> RequestParser {
        RequestParser::new(DEFAULT_MAX_PAYLOAD)
    }

    fn one(bytes: &[u8]) -> Result<Option<Parsed>, HttpError> {
        let mut p = parser();
        p.push(bytes);
        p.next_request()
    }

    fn request(bytes: &[u8]) -> Request {
        match one(bytes) {
            Ok(Some(Parsed::Request(r))) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn simple_get_and_put() {
        let r = request(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/");
        assert!(r.body.is_empty());
        assert!(r.keep_alive);
        let r = request(b"PUT /drives/root HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(r.method, Method::Put);
        assert_eq!(r.path, "/drives/root");
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn query_and_absolute_form_are_stripped() {
        assert_eq!(
            request(b"GET /version?x=1 HTTP/1.1\r\n\r\n").path,
            "/version"
        );
        assert_eq!(
            request(b"GET http://localhost/version HTTP/1.1\r\n\r\n").path,
            "/version"
        );
        assert_eq!(request(b"GET http://localhost HTTP/1.1\r\n\r\n").path, "/");
    }

    #[test]
    fn other_methods_are_carried_for_the_router() {
        let r = request(b"DELETE /drives/x HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, Method::Other("DELETE".into()));
        assert_eq!(r.method.to_string(), "DELETE");
    }

    #[test]
    fn bytes_arriving_one_at_a_time() {
        let raw =
            b"PATCH /machine-config HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"vcpu_count\": 2}";
        let mut p = parser();
        for (i, b) in raw.iter().enumerate() {
            p.push(std::slice::from_ref(b));
            let got = p.next_request().unwrap();
            if i + 1 < raw.len() {
                assert_eq!(got, None, "complete too early at byte {i}");
                assert!(p.in_request());
            } else {
                let Some(Parsed::Request(r)) = got else {
                    panic!("{got:?}")
                };
                assert_eq!(r.body, b"{\"vcpu_count\": 2}");
            }
        }
        assert_eq!(p.buffered(), 0);
        assert!(!p.in_request());
    }

    #[test]
    fn split_inside_the_terminator() {
        let mut p = parser();
        p.push(b"GET / HTTP/1.1\r\n\r");
        assert_eq!(p.next_request(), Ok(None));
        p.push(b"\n");
        assert!(matches!(p.next_request(), Ok(Some(Parsed::Request(_)))));
    }

    #[test]
    fn pipelined_requests_come_out_in_order() {
        let mut p = parser();
        p.push(b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyzGET /c HTTP/1.1\r\n\r\nGET /d");
        let mut paths = vec![];
        while let Some(Parsed::Request(r)) = p.next_request().unwrap() {
            paths.push(r.path);
        }
        assert_eq!(paths, ["/a", "/b", "/c"]);
        assert!(p.in_request());
        p.push(b" HTTP/1.1\r\n\r\n");
        let Some(Parsed::Request(r)) = p.next_request().unwrap() else {
            panic!()
        };
        assert_eq!(r.path, "/d");
    }

    #[test]
    fn leading_blank_lines_are_ignored() {
        let mut p = parser();
        p.push(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert!(matches!(p.next_request(), Ok(Some(Parsed::Request(_)))));
        p.push(b"\r\n");
        assert!(!p.in_request());
    }

    #[test]
    fn oversized_body_is_refused_from_the_header_alone() {
        let mut p = parser();
        p.push(b"PUT /drives/x HTTP/1.1\r\nContent-Length: 51201\r\n\r\n{\"drive");
        assert_eq!(
            p.next_request(),
            Err(HttpError::PayloadTooLarge {
                size: "51201".into(),
                limit: 51200
            })
        );
        let err =
            one(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Request payload with size 99999999999999999999 is larger than the limit of 51200 allowed by server."
        );
        assert_eq!(err.status(), 400);
        // Exactly at the limit is fine.
        let mut p = RequestParser::new(4);
        p.push(b"PUT / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd");
        assert!(matches!(p.next_request(), Ok(Some(Parsed::Request(_)))));
        assert_eq!(p.buffer_limit(), MAX_HEADER_BYTES + 4);
    }

    #[test]
    fn content_length_overflowing_u64_is_too_large() {
        assert!(matches!(
            one(b"PUT / HTTP/1.1\r\nContent-Length: 999999999999999999999999\r\n\r\n"),
            Err(HttpError::PayloadTooLarge { size, .. }) if size == "999999999999999999999999"
        ));
        assert!(matches!(
            one(b"PUT / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"),
            Err(HttpError::ContentLength(_))
        ));
    }

    #[test]
    fn header_section_is_bounded() {
        let mut p = parser();
        p.push(b"GET / HTTP/1.1\r\nX-Long: ");
        p.push(&vec![b'a'; MAX_HEADER_BYTES]);
        assert_eq!(
            p.next_request(),
            Err(HttpError::HeaderTooLarge(MAX_HEADER_BYTES))
        );
        // A header that ends just past the limit is refused too, even though
        // its terminator has arrived.
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.resize(MAX_HEADER_BYTES, b'a');
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(one(&raw), Err(HttpError::HeaderTooLarge(MAX_HEADER_BYTES)));
    }

    #[test]
    fn transfer_encoding_is_refused_unless_identity() {
        assert!(matches!(
            one(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::TransferEncoding(v)) if v == "chunked"
        ));
        let r =
            request(b"PUT / HTTP/1.1\r\nTransfer-Encoding: Identity\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(r.body, b"x");
    }

    #[test]
    fn expect_continue_asks_for_an_interim_response_once() {
        let mut p = parser();
        p.push(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(p.next_request(), Ok(Some(Parsed::SendContinue)));
        assert_eq!(p.next_request(), Ok(None));
        p.push(b"{}");
        assert!(matches!(p.next_request(), Ok(Some(Parsed::Request(_)))));
        // Body already here: no interim response.
        assert!(matches!(
            one(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}"),
            Ok(Some(Parsed::Request(_)))
        ));
        let err = one(b"PUT /x HTTP/1.1\r\nExpect: magic\r\n\r\n").unwrap_err();
        assert_eq!(err.status(), 417);
        let mut out = vec![];
        write_continue(&mut out);
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn bad_headers_are_refused() {
        for raw in [
            &b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x01c\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        ] {
            let got = one(raw);
            assert!(
                got.is_err(),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(got.unwrap_err().status(), 400);
        }
    }

    #[test]
    fn bad_request_lines_are_refused() {
        for raw in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET version HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
            b"\x00\x01\x02\x03\r\n\r\n",
        ] {
            assert!(
                matches!(one(raw), Err(HttpError::RequestLine(_))),
                "{raw:?}"
            );
        }
        assert_eq!(
            one(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HttpError::Version("HTTP/2.0".into()))
        );
        assert!(matches!(
            one(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Some(_))
        ));
    }

    #[test]
    fn bare_lf_is_refused_without_waiting_for_more() {
        assert_eq!(one(b"GET / HTTP/1.1\n\n"), Err(HttpError::BareLf));
        assert_eq!(one(b"GET / HTTP/1.1\r\nHost: x\n"), Err(HttpError::BareLf));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random byte soup in varied chunk sizes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..200 {
            let mut p = RequestParser::new(64);
            for _ in 0..50 {
                let len = (x % 97) as usize;
                let chunk: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Bias towards the bytes the parser cares about.
                        match x % 8 {
                            0 => b'\r',
                            1 => b'\n',
                            2 => b' ',
                            3 => b':',
                            _ => (x >> 8) as u8,
                        }
                    })
                    .collect();
                p.push(&chunk);
                if p.next_request().is_err() {
                    break;
                }
                assert!(p.buffered() <= MAX_HEADER_BYTES + 64 + 97, "round {round}");
            }
        }
    }

    #[test]
    fn http10_closes_unless_asked_and_close_is_honoured() {
        assert!(!request(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!request(b"GET / HTTP/1.1\r\nConnection: TE, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn responses_are_framed() {
        let mut out = vec![];
        write_response(&mut out, 204, None, true);
        assert_eq!(
            out,
            b"HTTP/1.1 204 No Content\r\nServer: ringvm API\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        write_response(&mut out, 400, Some("{\"fault_message\":\"x\"}"), false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.contains(
            "Content-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"fault_message\":\"x\"}"
        ));
    }
}
