//! The server over real host directories: what a Linux client does, and
//! what a hostile one tries (escapes through `..`, names with `/`,
//! symbolic links pointing out of the share, writes to a read-only share).

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::server::{Action, Server};
use super::wire::{qid_type, Qid, Reply, SetAttr, Tmessage, NOFID};
use super::{ControlFs, HostFs, MAX_MSIZE};

const EINVAL: u32 = libc::EINVAL as u32;
const EROFS: u32 = libc::EROFS as u32;

/// A scratch directory removed at the end of the test.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    pub(super) fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ringvm-p9-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The layout every test starts from:
///
/// ```text
/// outside/secret              (outside the share)
/// share/hello.txt             "hello world"
/// share/sub/inner.txt         "inner"
/// share/up    -> ../outside   (relative escape)
/// share/abs   -> <outside>    (absolute escape)
/// ```
fn layout(name: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new(name);
    let outside = s.path().join("outside");
    let share = s.path().join("share");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"top secret").unwrap();
    fs::create_dir_all(share.join("sub")).unwrap();
    fs::write(share.join("hello.txt"), b"hello world").unwrap();
    fs::write(share.join("sub/inner.txt"), b"inner").unwrap();
    symlink("../outside", share.join("up")).unwrap();
    symlink(&outside, share.join("abs")).unwrap();
    (s, share)
}

fn server(share: &Path, writable: bool) -> Server<HostFs> {
    let mut s = Server::new(HostFs::new(share, writable).expect("share"), MAX_MSIZE);
    attach(&mut s, 0);
    s
}

fn attach<F: super::Filesystem>(s: &mut Server<F>, fid: u32) -> Qid {
    let v = s.handle(
        &Tmessage::Version {
            msize: 1 << 20,
            version: b"9P2000.L",
        },
        4096,
    );
    assert!(matches!(
        v,
        Action::Reply(Reply::Version {
            msize: MAX_MSIZE,
            ..
        })
    ));
    match s.handle(
        &Tmessage::Attach {
            fid,
            afid: NOFID,
            uname: b"root",
            aname: b"",
            n_uname: 0,
        },
        4096,
    ) {
        Action::Reply(Reply::Attach(q)) => q,
        other => panic!("attach: {other:?}"),
    }
}

fn reply<F: super::Filesystem>(s: &mut Server<F>, m: Tmessage<'_>) -> Reply {
    match s.handle(&m, 1 << 20) {
        Action::Reply(r) => r,
        other => panic!("{m:?} gave {other:?}"),
    }
}

fn walk<F: super::Filesystem>(s: &mut Server<F>, fid: u32, newfid: u32, names: &[&[u8]]) -> Reply {
    reply(
        s,
        Tmessage::Walk {
            fid,
            newfid,
            names: names.to_vec(),
        },
    )
}

fn lopen<F: super::Filesystem>(s: &mut Server<F>, fid: u32, flags: i32) -> Reply {
    reply(
        s,
        Tmessage::Lopen {
            fid,
            flags: flags as u32,
        },
    )
}

/// Reads through the Action's host descriptor, as the device would.
fn read_all<F: super::Filesystem>(s: &mut Server<F>, fid: u32) -> Vec<u8> {
    match s.handle(
        &Tmessage::Read {
            fid,
            offset: 0,
            count: 4096,
        },
        8192,
    ) {
        Action::Read {
            file,
            offset,
            count,
        } => {
            let mut buf = vec![0u8; count as usize];
            // SAFETY: pread into our own buffer.
            let n = unsafe {
                libc::pread(
                    file.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    offset as i64,
                )
            };
            assert!(n >= 0);
            buf.truncate(n as usize);
            buf
        }
        other => panic!("read: {other:?}"),
    }
}

#[test]
fn a_client_walks_opens_and_reads() {
    let (_s, share) = layout("read");
    let mut s = server(&share, false);
    let Reply::Walk(qids) = walk(&mut s, 0, 1, &[b"sub", b"inner.txt"]) else {
        panic!("walk");
    };
    assert_eq!(qids.len(), 2);
    assert_eq!(qids[0].ty, qid_type::DIR);
    assert_eq!(qids[1].ty, qid_type::FILE);
    assert!(matches!(
        lopen(&mut s, 1, libc::O_RDONLY),
        Reply::Lopen { .. }
    ));
    assert_eq!(read_all(&mut s, 1), b"inner");
    let Reply::Getattr(a) = reply(&mut s, Tmessage::Getattr { fid: 1, mask: !0 }) else {
        panic!("getattr");
    };
    assert_eq!(a.size, 5);
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(reply(&mut s, Tmessage::Clunk { fid: 1 }), Reply::Clunk);
    assert_eq!(
        reply(&mut s, Tmessage::Clunk { fid: 1 }),
        Reply::Lerror(libc::EBADF as u32)
    );
}

#[test]
fn directories_list_every_entry_once_across_small_reads() {
    let (_s, share) = layout("readdir");
    for i in 0..40 {
        fs::write(share.join(format!("file-{i:02}")), b"x").unwrap();
    }
    let mut s = server(&share, false);
    walk(&mut s, 0, 1, &[]);
    assert!(matches!(
        lopen(&mut s, 1, libc::O_RDONLY | libc::O_DIRECTORY),
        Reply::Lopen { .. }
    ));
    let mut names = Vec::new();
    let mut offset = 0u64;
    loop {
        // A small reply room forces many Treaddir round trips.
        let Action::Reply(Reply::Readdir(data)) = s.handle(
            &Tmessage::Readdir {
                fid: 1,
                offset,
                count: 200,
            },
            1 << 20,
        ) else {
            panic!("readdir");
        };
        assert!(data.len() <= 200);
        if data.is_empty() {
            break;
        }
        let mut pos = 0;
        while pos < data.len() {
            let off = u64::from_le_bytes(data[pos + 13..pos + 21].try_into().unwrap());
            let len = u16::from_le_bytes([data[pos + 22], data[pos + 23]]) as usize;
            names.push(String::from_utf8_lossy(&data[pos + 24..pos + 24 + len]).into_owned());
            offset = off;
            pos += 24 + len;
        }
    }
    names.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("file-{i:02}")).collect();
    want.extend([".", "..", "abs", "hello.txt", "sub", "up"].map(String::from));
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn dot_dot_never_leaves_the_share() {
    let (_s, share) = layout("dotdot");
    let mut s = server(&share, false);
    let root = match walk(&mut s, 0, 9, &[]) {
        Reply::Walk(q) => q,
        other => panic!("{other:?}"),
    };
    assert!(root.is_empty());
    // At the root, ".." is the root.
    let Reply::Walk(q) = walk(&mut s, 0, 1, &[b"..", b"..", b"hello.txt"]) else {
        panic!("walk");
    };
    assert_eq!(q.len(), 3);
    assert_eq!(q[0], q[1]);
    assert_eq!(
        lopen(&mut s, 1, libc::O_RDONLY),
        Reply::Lopen {
            qid: q[2],
            iounit: 0
        }
    );
    assert_eq!(read_all(&mut s, 1), b"hello world");
    // Below the root, ".." is refused: a partial walk binds nothing.
    let r = walk(&mut s, 0, 2, &[b"sub", b"..", b"..", b"outside"]);
    assert!(matches!(r, Reply::Walk(ref q) if q.len() == 1), "{r:?}");
    assert_eq!(
        reply(&mut s, Tmessage::Getattr { fid: 2, mask: !0 }),
        Reply::Lerror(libc::EBADF as u32)
    );
    // A first name that fails is an error.
    assert_eq!(walk(&mut s, 0, 2, &[b"../outside"]), Reply::Lerror(EINVAL));
    for bad in [b"a/b".as_slice(), b"", b"x\0y", b"/etc"] {
        assert_eq!(walk(&mut s, 0, 3, &[bad]), Reply::Lerror(EINVAL), "{bad:?}");
    }
    let long = vec![b'a'; 256];
    assert_eq!(
        walk(&mut s, 0, 3, &[&long]),
        Reply::Lerror(libc::ENAMETOOLONG as u32)
    );
}

#[test]
fn symbolic_links_are_never_followed_on_the_host() {
    let (_s, share) = layout("symlink");
    let mut s = server(&share, false);
    for link in [b"up".as_slice(), b"abs"] {
        // The link itself is a node: a symlink qid, readable with readlink.
        let Reply::Walk(q) = walk(&mut s, 0, 1, &[link]) else {
            panic!("walk");
        };
        assert_eq!(q[0].ty, qid_type::SYMLINK);
        let Reply::Readlink(target) = reply(&mut s, Tmessage::Readlink { fid: 1 }) else {
            panic!("readlink");
        };
        assert!(!target.is_empty());
        // Opening it does not open what it points at.
        assert_eq!(
            lopen(&mut s, 1, libc::O_RDONLY),
            Reply::Lerror(libc::ELOOP as u32)
        );
        // Walking through it finds nothing.
        let r = walk(&mut s, 0, 2, &[link, b"secret"]);
        assert!(matches!(r, Reply::Walk(ref q) if q.len() == 1), "{r:?}");
        let r = walk(&mut s, 1, 2, &[b"secret"]);
        assert_eq!(r, Reply::Lerror(libc::ENOTDIR as u32));
        // Its attributes are the link's, not the target's.
        let Reply::Getattr(a) = reply(&mut s, Tmessage::Getattr { fid: 1, mask: !0 }) else {
            panic!("getattr");
        };
        assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);
        reply(&mut s, Tmessage::Clunk { fid: 1 });
    }
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let (_s, share) = layout("ro");
    let mut s = server(&share, false);
    walk(&mut s, 0, 1, &[b"hello.txt"]);
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(lopen(&mut s, 1, flags), Reply::Lerror(EROFS));
    }
    walk(&mut s, 0, 2, &[]);
    let changes: Vec<Tmessage<'_>> = vec![
        Tmessage::Lcreate {
            fid: 2,
            name: b"new",
            flags: libc::O_WRONLY as u32,
            mode: 0o644,
            gid: 0,
        },
        Tmessage::Mkdir {
            dfid: 0,
            name: b"d",
            mode: 0o755,
            gid: 0,
        },
        Tmessage::Symlink {
            fid: 0,
            name: b"l",
            target: b"x",
            gid: 0,
        },
        Tmessage::Unlinkat {
            dirfid: 0,
            name: b"hello.txt",
            flags: 0,
        },
        Tmessage::Renameat {
            olddirfid: 0,
            oldname: b"hello.txt",
            newdirfid: 0,
            newname: b"bye.txt",
        },
        Tmessage::Link {
            dfid: 0,
            fid: 1,
            name: b"hard",
        },
        Tmessage::Setattr {
            fid: 1,
            attr: SetAttr {
                valid: super::wire::setattr::SIZE,
                ..SetAttr::default()
            },
        },
    ];
    for m in changes {
        assert_eq!(reply(&mut s, m.clone()), Reply::Lerror(EROFS), "{m:?}");
    }
    assert_eq!(fs::read(share.join("hello.txt")).unwrap(), b"hello world");
    let mut names: Vec<_> = fs::read_dir(&share)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["abs", "hello.txt", "sub", "up"]);
}

#[test]
fn a_writable_share_takes_creates_renames_and_removals() {
    let (s_, share) = layout("rw");
    let mut s = server(&share, true);
    walk(&mut s, 0, 1, &[b"sub"]);
    let Reply::Lcreate { qid, .. } = reply(
        &mut s,
        Tmessage::Lcreate {
            fid: 1,
            name: b"new.txt",
            flags: (libc::O_RDWR | libc::O_EXCL) as u32,
            mode: 0o640,
            gid: 0,
        },
    ) else {
        panic!("lcreate");
    };
    assert_eq!(qid.ty, qid_type::FILE);
    // fid 1 is now the new file, open for writing.
    let Action::Write { file, .. } = s.handle(
        &Tmessage::Write {
            fid: 1,
            offset: 0,
            count: 3,
        },
        64,
    ) else {
        panic!("write");
    };
    // SAFETY: pwrite from a static buffer.
    let n = unsafe { libc::pwrite(file.fd.as_raw_fd(), b"abc".as_ptr().cast(), 3, 0) };
    assert_eq!(n, 3);
    assert_eq!(fs::read(share.join("sub/new.txt")).unwrap(), b"abc");
    assert!(matches!(
        reply(
            &mut s,
            Tmessage::Mkdir {
                dfid: 0,
                name: b"made",
                mode: 0o755,
                gid: 0
            }
        ),
        Reply::Mkdir(q) if q.ty == qid_type::DIR
    ));
    walk(&mut s, 0, 2, &[b"sub"]);
    walk(&mut s, 0, 3, &[b"made"]);
    assert_eq!(
        reply(
            &mut s,
            Tmessage::Renameat {
                olddirfid: 2,
                oldname: b"new.txt",
                newdirfid: 3,
                newname: b"moved.txt"
            }
        ),
        Reply::Renameat
    );
    assert_eq!(fs::read(share.join("made/moved.txt")).unwrap(), b"abc");
    // The open fid still names the same file after the rename.
    let attr = SetAttr {
        valid: super::wire::setattr::SIZE | super::wire::setattr::MODE,
        size: 1,
        mode: 0o600,
        ..SetAttr::default()
    };
    assert_eq!(
        reply(&mut s, Tmessage::Setattr { fid: 1, attr }),
        Reply::Setattr
    );
    assert_eq!(fs::read(share.join("made/moved.txt")).unwrap(), b"a");
    assert!(matches!(
        reply(
            &mut s,
            Tmessage::Symlink {
                fid: 3,
                name: b"ln",
                target: b"/anywhere/at/all",
                gid: 0
            }
        ),
        Reply::Symlink(q) if q.ty == qid_type::SYMLINK
    ));
    assert_eq!(
        fs::read_link(share.join("made/ln")).unwrap(),
        Path::new("/anywhere/at/all")
    );
    // Creating through a symbolic link is refused, not followed.
    walk(&mut s, 0, 4, &[]);
    assert_eq!(
        reply(
            &mut s,
            Tmessage::Lcreate {
                fid: 4,
                name: b"abs",
                flags: libc::O_WRONLY as u32,
                mode: 0o644,
                gid: 0
            }
        ),
        Reply::Lerror(libc::ELOOP as u32)
    );
    assert!(!s_.path().join("outside/abs").exists());
    assert_eq!(
        reply(
            &mut s,
            Tmessage::Unlinkat {
                dirfid: 3,
                name: b"moved.txt",
                flags: 0
            }
        ),
        Reply::Unlinkat
    );
    assert!(!share.join("made/moved.txt").exists());
    assert_eq!(
        reply(
            &mut s,
            Tmessage::Unlinkat {
                dirfid: 0,
                name: b"..",
                flags: libc::AT_REMOVEDIR as u32
            }
        ),
        Reply::Lerror(EINVAL)
    );
    assert_eq!(
        fs::read(s_.path().join("outside/secret")).unwrap(),
        b"top secret"
    );
}

#[test]
fn fids_and_msize_are_bounded() {
    let (_s, share) = layout("bounds");
    let mut s = server(&share, false);
    s.set_max_fids(3);
    walk(&mut s, 0, 1, &[]);
    walk(&mut s, 0, 2, &[]);
    assert_eq!(walk(&mut s, 0, 3, &[]), Reply::Lerror(libc::ENFILE as u32));
    // Rebinding an existing fid is not a new one.
    assert_eq!(
        walk(&mut s, 0, 2, &[b"sub"]),
        Reply::Lerror(libc::EBADF as u32)
    );
    assert!(matches!(walk(&mut s, 2, 2, &[b"sub"]), Reply::Walk(_)));
    // Reads never ask for more than msize or the reply room allows.
    walk(&mut s, 0, 1, &[b"hello.txt"]);
    let _ = s.handle(&Tmessage::Clunk { fid: 2 }, 64);
    walk(&mut s, 0, 2, &[b"hello.txt"]);
    lopen(&mut s, 2, libc::O_RDONLY);
    match s.handle(
        &Tmessage::Read {
            fid: 2,
            offset: 0,
            count: u32::MAX,
        },
        1000,
    ) {
        Action::Read { count, .. } => assert_eq!(count, 1000 - 11),
        other => panic!("{other:?}"),
    }
    // A new session forgets every fid; msize is the smaller one.
    let v = s.handle(
        &Tmessage::Version {
            msize: 8192,
            version: b"9P2000.L",
        },
        64,
    );
    assert!(matches!(
        v,
        Action::Reply(Reply::Version { msize: 8192, .. })
    ));
    assert_eq!(s.fid_count(), 0);
    let v = s.handle(
        &Tmessage::Version {
            msize: 8192,
            version: b"9P2000.u",
        },
        64,
    );
    assert!(matches!(
        v,
        Action::Reply(Reply::Version {
            version: b"unknown",
            ..
        })
    ));
}

#[test]
fn the_control_tree_serves_init_config_and_stdio() {
    let s_ = Scratch::new("control");
    let out_path = s_.path().join("out");
    let out = fs::File::create(&out_path).unwrap();
    let init = b"\x7fELF fake init".to_vec();
    let fs_ = ControlFs::new(&init, b"cfg", [0, out.as_raw_fd(), out.as_raw_fd()]).unwrap();
    let mut s = Server::new(fs_, MAX_MSIZE);
    attach(&mut s, 0);
    walk(&mut s, 0, 1, &[b"init"]);
    assert_eq!(
        lopen(&mut s, 1, libc::O_RDONLY),
        Reply::Lopen {
            qid: Qid {
                ty: qid_type::FILE,
                version: 0,
                path: 2
            },
            iounit: 0
        }
    );
    assert_eq!(read_all(&mut s, 1), init);
    let Reply::Getattr(a) = reply(&mut s, Tmessage::Getattr { fid: 1, mask: !0 }) else {
        panic!()
    };
    assert_eq!(a.size, init.len() as u64);
    assert_eq!(a.mode, libc::S_IFREG | 0o555);
    walk(&mut s, 0, 2, &[b"config"]);
    assert_eq!(lopen(&mut s, 2, libc::O_WRONLY), Reply::Lerror(EROFS));
    walk(&mut s, 0, 3, &[b"stdout"]);
    assert_eq!(
        lopen(&mut s, 3, libc::O_RDONLY),
        Reply::Lerror(libc::EACCES as u32)
    );
    assert!(matches!(
        lopen(&mut s, 3, libc::O_WRONLY),
        Reply::Lopen { .. }
    ));
    let Action::Write { file, .. } = s.handle(
        &Tmessage::Write {
            fid: 3,
            offset: 12345,
            count: 2,
        },
        64,
    ) else {
        panic!()
    };
    assert!(file.stream, "stdio is a stream: offsets are ignored");
    // fsync on a stream is a no-op success.
    assert_eq!(
        reply(
            &mut s,
            Tmessage::Fsync {
                fid: 3,
                datasync: 0
            }
        ),
        Reply::Fsync
    );
    walk(&mut s, 0, 4, &[b"mnt"]);
    assert_eq!(
        walk(&mut s, 4, 5, &[b"x"]),
        Reply::Lerror(libc::ENOENT as u32)
    );
    assert_eq!(
        walk(&mut s, 0, 5, &[b"nope"]),
        Reply::Lerror(libc::ENOENT as u32)
    );
    let mut f = fs::File::open(&out_path).unwrap();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
}
