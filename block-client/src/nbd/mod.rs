//! NBD: a pipelined client ([`NbdClient`]) and a multi-client server ([`serve`]) speaking
//! the fixed-newstyle protocol of the NBD project's `doc/proto.md`.
//!
//! Why not the `nbd` crate (0.3.1): it is synchronous with one request in flight and cookie
//! always 0, negotiates only NBD_OPT_EXPORT_NAME (no GO, no block-size constraints), has no
//! FUA, WRITE_ZEROES or structured replies, sends requests as large as the caller's buffer
//! (over the server's limit that kills the connection), and its server drops the connection
//! on unknown options where the spec asks for NBD_REP_ERR_UNSUP. Both halves are ours.

pub mod client;
pub mod proto;
mod reply_buf;
pub mod server;
mod transport;
mod uri;

pub use client::{ExportInfo, NbdClient, NbdClientOptions, Pending};
pub use server::{
    run_serve_lun, serve, serve_device, ListenAddr, ServeError, ServeOptions, ServerHandle,
};
pub use uri::{NbdAddr, NbdUri, UriError};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FailKind, FlakyDisk, MemDevice, OpClass};
    use crate::{BlockDevice, BlockError, WriteFlags};
    use std::sync::Arc;

    pub(super) fn sock(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("bc-nbd-{}-{name}.sock", std::process::id()))
    }

    /// A server with default options on a fresh `bytes`-byte device whose failures the
    /// returned handle controls.
    fn flaky_server(name: &str, bytes: u64) -> (ServerHandle, crate::testing::FlakyHandle) {
        let flaky = Arc::new(FlakyDisk::new(MemDevice::new(bytes)));
        let h = flaky.handle();
        let listen = ListenAddr::Unix(sock(name));
        (
            serve_device(flaky, &listen, ServeOptions::default()).unwrap(),
            h,
        )
    }

    /// A server with default options on a fresh `bytes`-byte memory device, and a client
    /// with default options connected to it.
    fn mem_server(name: &str, bytes: u64) -> (ServerHandle, Arc<MemDevice>, NbdClient) {
        let mem = Arc::new(MemDevice::new(bytes));
        let listen = ListenAddr::Unix(sock(name));
        let server = serve_device(mem.clone(), &listen, ServeOptions::default()).unwrap();
        let c = NbdClient::open(&server.uri(), NbdClientOptions::default()).unwrap();
        (server, mem, c)
    }

    #[test]
    fn client_and_server_round_trip_over_unix_socket() {
        for structured in [false, true] {
            let path = sock(if structured { "s" } else { "p" });
            let mem = Arc::new(MemDevice::new(8 << 20));
            let opts = ServeOptions {
                export_name: "lun".into(),
                max_block_bytes: 64 << 10,
                ..Default::default()
            };
            let server = serve_device(mem.clone(), &ListenAddr::Unix(path.clone()), opts).unwrap();
            let copts = NbdClientOptions {
                structured_replies: structured,
                ..Default::default()
            };
            let c = NbdClient::open(&server.uri(), copts).unwrap();
            assert_eq!(c.size_bytes(), 8 << 20);
            assert_eq!(c.info().structured_replies, structured);
            assert_eq!(c.max_request_bytes(), 64 << 10);
            assert_eq!(c.connection_count(), 2);
            // Larger than max_block_bytes: split into several requests.
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
            c.write_at(&data, 4096, WriteFlags::FUA).unwrap();
            let mut back = vec![0u8; data.len()];
            c.read_at(&mut back, 4096).unwrap();
            assert_eq!(back, data);
            assert_eq!(&mem.image()[4096..4096 + data.len()], &data[..]);
            c.write_zeroes(8192, 10_000).unwrap();
            c.read_at(&mut back[..10_000], 8192).unwrap();
            assert!(back[..10_000].iter().all(|&b| b == 0));
            c.trim(0, 4096).unwrap();
            c.flush().unwrap();
            assert!(matches!(
                c.read_at(&mut [0u8; 2], (8 << 20) - 1),
                Err(BlockError::OutOfRange { .. })
            ));
            drop(c);
            server.shutdown().unwrap();
            assert!(!path.exists());
        }
    }

    #[test]
    fn reused_server_buffers_carry_nothing_between_requests() {
        // The server reuses payload and reply buffers: a small request after a large one
        // must carry only its own bytes, either way.
        let (server, mem, c) = mem_server("pool", 4 << 20);
        let sizes = [1usize << 20, 4096, 100, 65536, 1, 1 << 20, 7, 300_000, 512];
        for round in 0..3u8 {
            for (i, &n) in sizes.iter().enumerate() {
                let at = (i as u64 * 37 * 4096 + u64::from(round) * 8192) % (3 << 20);
                let fill = round
                    .wrapping_mul(31)
                    .wrapping_add(u8::try_from(i + 1).unwrap());
                let data: Vec<u8> = (0..n)
                    .map(|k| fill ^ u8::try_from(k % 251).unwrap())
                    .collect();
                c.write_at(&data, at, WriteFlags::default()).unwrap();
                let mut back = vec![0u8; n];
                c.read_at(&mut back, at).unwrap();
                assert_eq!(back, data, "request {i} of round {round} read back");
                // A window around it reads exactly what the device holds.
                let lo = at.saturating_sub(4096);
                let mut window = vec![0u8; n + 8192];
                c.read_at(&mut window, lo).unwrap();
                let img = mem.image();
                let lo_i = usize::try_from(lo).unwrap();
                assert_eq!(window, &img[lo_i..lo_i + window.len()]);
            }
        }
        drop(c);
        server.shutdown().unwrap();
    }

    #[test]
    fn server_answers_unknown_options_and_export_name_by_the_spec() {
        use proto::*;
        use std::io::{Read, Write};
        let path = sock("raw");
        let mem = Arc::new(MemDevice::new(1 << 20));
        mem.write_at(&[9u8; 512], 512, WriteFlags::default())
            .unwrap();
        let server = serve_device(
            mem,
            &ListenAddr::Unix(path.clone()),
            ServeOptions::default(),
        )
        .unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert_eq!(read_u64(&mut s).unwrap(), NBDMAGIC);
        assert_eq!(read_u64(&mut s).unwrap(), IHAVEOPT);
        let hflags = read_u16(&mut s).unwrap();
        assert_eq!(
            hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        let reply = |s: &mut std::os::unix::net::UnixStream, opt: u32| {
            assert_eq!(read_u64(s).unwrap(), OPT_REPLY_MAGIC);
            assert_eq!(read_u32(s).unwrap(), opt);
            let kind = read_u32(s).unwrap();
            let len = read_u32(s).unwrap();
            (kind, read_vec(s, len).unwrap())
        };
        // An option the server does not know: ERR_UNSUP, and the connection stays open.
        write_option(&mut s, 42, b"whatever").unwrap();
        assert_eq!(reply(&mut s, 42).0, REP_ERR_UNSUP);
        write_option(&mut s, OPT_LIST, &[]).unwrap();
        let (kind, data) = reply(&mut s, OPT_LIST);
        assert_eq!((kind, data), (REP_SERVER, vec![0, 0, 0, 0]));
        assert_eq!(reply(&mut s, OPT_LIST).0, REP_ACK);
        // INFO for a missing export: ERR_UNKNOWN.
        let mut info = 3u32.to_be_bytes().to_vec();
        info.extend_from_slice(b"nop");
        info.extend_from_slice(&0u16.to_be_bytes());
        write_option(&mut s, OPT_INFO, &info).unwrap();
        assert_eq!(reply(&mut s, OPT_INFO).0, REP_ERR_UNKNOWN);
        // The old way in: EXPORT_NAME, size and flags, no zero padding (NO_ZEROES).
        write_option(&mut s, OPT_EXPORT_NAME, b"").unwrap();
        assert_eq!(read_u64(&mut s).unwrap(), 1 << 20);
        let tflags = read_u16(&mut s).unwrap();
        assert!(tflags & TFLAG_CAN_MULTI_CONN != 0 && tflags & TFLAG_SEND_FLUSH != 0);
        // A raw READ gets a simple reply (structured replies were not negotiated).
        s.write_all(&encode_request(0, CMD_READ, 77, 512, 512))
            .unwrap();
        assert_eq!(read_u32(&mut s).unwrap(), SIMPLE_REPLY_MAGIC);
        assert_eq!(read_u32(&mut s).unwrap(), 0);
        assert_eq!(read_u64(&mut s).unwrap(), 77);
        let mut data = [0u8; 512];
        s.read_exact(&mut data).unwrap();
        assert_eq!(data, [9u8; 512]);
        // Past the end: an error reply, not a dropped connection.
        s.write_all(&encode_request(0, CMD_READ, 78, 1 << 20, 512))
            .unwrap();
        assert_eq!(read_u32(&mut s).unwrap(), SIMPLE_REPLY_MAGIC);
        assert_eq!(read_u32(&mut s).unwrap(), NBD_EINVAL);
        assert_eq!(read_u64(&mut s).unwrap(), 78);
        s.write_all(&encode_request(0, CMD_DISC, 79, 0, 0)).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        server.shutdown().unwrap();
    }

    #[test]
    fn wrong_export_name_is_open_error() {
        let path = sock("name");
        let server = serve_device(
            Arc::new(MemDevice::new(4096)),
            &ListenAddr::Unix(path.clone()),
            ServeOptions::default(),
        )
        .unwrap();
        let uri = format!("nbd+unix:///nope?socket={}", path.display());
        let err = NbdClient::open(&uri, NbdClientOptions::default()).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
        drop(server);
    }

    #[test]
    fn device_error_is_typed_and_connection_survives() {
        let path = sock("flaky");
        let flaky = Arc::new(FlakyDisk::new(MemDevice::new(1 << 20)));
        let h = flaky.handle();
        let server = serve_device(
            flaky,
            &ListenAddr::Unix(path.clone()),
            ServeOptions::default(),
        )
        .unwrap();
        let c = NbdClient::open(&server.uri(), NbdClientOptions::default()).unwrap();
        h.fail_nth(OpClass::Read, 1, FailKind::Device(libc::EIO));
        let mut b = [0u8; 512];
        let e = c.read_at(&mut b, 0).unwrap_err();
        assert!(
            matches!(&e, BlockError::Device { source, .. } if source.raw_os_error() == Some(libc::EIO)),
            "{e:?}"
        );
        c.read_at(&mut b, 0).unwrap();
        h.fail_nth(OpClass::Write, 1, FailKind::Device(libc::ENOSPC));
        let e = c.write_at(&b, 0, WriteFlags::default()).unwrap_err();
        assert!(
            matches!(&e, BlockError::Device { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{e:?}"
        );
        c.write_at(&b, 0, WriteFlags::default()).unwrap();
        drop(c);
        drop(server);
    }

    #[test]
    fn one_thread_keeps_many_requests_in_flight() {
        let (_server, _mem, c) = mem_server("pending", 4 << 20);
        let writes: Vec<_> = (0..32u8)
            .map(|i| {
                c.start_write(vec![i; 4096], u64::from(i) * 4096, WriteFlags::default())
                    .unwrap()
            })
            .collect();
        for w in writes {
            assert!(w.wait().unwrap().is_empty());
        }
        let reads: Vec<_> = (0..32u8)
            .map(|i| c.start_read(u64::from(i) * 4096, 4096).unwrap())
            .collect();
        for (i, r) in reads.into_iter().enumerate() {
            let data = r.wait().unwrap();
            assert!(data.iter().all(|&b| usize::from(b) == i), "block {i}");
            c.recycle_buffer(data);
        }
        assert!(matches!(
            c.start_read(4 << 20, 1),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.start_read(0, 64 << 20),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn async_requests_complete_on_the_reply_thread() {
        let (server, h) = flaky_server("async", 4 << 20);
        let c = NbdClient::open(&server.uri(), NbdClientOptions::default()).unwrap();
        let read = |offset_bytes, len_bytes| crate::AsyncIo::Read {
            offset_bytes,
            len_bytes,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let done = |i: u8| -> crate::Completion {
            let tx = tx.clone();
            Box::new(move |r| tx.send((i, r)).unwrap())
        };
        for i in 0..32u8 {
            let buf = [i; 4096];
            let w = crate::AsyncIo::Write {
                buf: &buf,
                offset_bytes: u64::from(i) * 4096,
            };
            assert!(c.submit(w, done(i)).is_ok());
        }
        for _ in 0..32 {
            let (i, r) = rx.recv().unwrap();
            assert!(r.unwrap().is_empty(), "write {i}");
        }
        for i in 0..32u8 {
            assert!(c.submit(read(u64::from(i) * 4096, 4096), done(i)).is_ok());
        }
        for _ in 0..32 {
            let (i, r) = rx.recv().unwrap();
            assert!(r.unwrap().iter().all(|&b| b == i), "block {i}");
        }
        // A device error reaches the completion, typed; requests outside the device or
        // larger than the server takes are handed back unstarted.
        h.fail_nth(OpClass::Read, 1, FailKind::Device(libc::EIO));
        assert!(c.submit(read(0, 512), done(0)).is_ok());
        let (_, r) = rx.recv().unwrap();
        assert!(
            matches!(&r, Err(BlockError::Device { source, .. }) if source.raw_os_error() == Some(libc::EIO)),
            "{r:?}"
        );
        assert!(c.submit(read(4 << 20, 1), done(0)).is_err());
        assert!(c.submit(read(0, 64 << 20), done(0)).is_err());
        // A closed client starts nothing.
        c.close();
        assert!(c
            .submit(
                crate::AsyncIo::Write {
                    buf: &[0; 512],
                    offset_bytes: 0
                },
                done(0)
            )
            .is_err());
    }

    /// A by-reference write from `data`, waited for; `data` is scribbled over right after
    /// the completion, so a completion reported before the server had the data (which
    /// would then send the scribble) would show in the reads that follow. A refused
    /// start (that connection not live yet) is retried after blocking reads, which
    /// reconnect.
    fn write_by_reference(c: &NbdClient, data: &mut [u8], offset_bytes: u64) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut done: crate::Completion = Box::new(move |r| tx.send(r).unwrap());
        let mut tries = 0;
        while let Err(refused) = c.submit_write_by_reference(data, offset_bytes, done) {
            tries += 1;
            assert!(tries < 32, "the client keeps refusing writes by reference");
            // Connections are taken in turn: a varying number of reads reaches them all.
            for _ in 0..tries {
                c.read_at(&mut [0u8; 512], 0).unwrap();
            }
            done = refused;
        }
        let r = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        assert!(r.unwrap().is_empty());
        data.fill(0xA5);
    }

    #[test]
    fn writes_by_reference_carry_their_exact_bytes_among_other_traffic() {
        let (_server, mem, c) = mem_server("by-ref", 64 << 20);
        let c = Arc::new(c);
        // Sizes around the connection pipe's 1 MiB (a request takes several rounds), and
        // buffers that start on and off a page boundary.
        let sizes = [
            1usize,
            4095,
            4096,
            65_543,
            (1 << 20) - 28,
            1 << 20,
            (1 << 20) + 1,
            3 << 20,
        ];
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for (i, &len) in sizes.iter().enumerate() {
                        let i = u8::try_from(i).unwrap();
                        let skew = usize::from(i % 3) * 1000;
                        let mut buf = vec![0u8; len + skew];
                        for (k, b) in buf[skew..].iter_mut().enumerate() {
                            *b = pattern(k, t, i);
                        }
                        let want = buf[skew..].to_vec();
                        let off = u64::from(t) * (16 << 20) + u64::from(i) * 4097;
                        write_by_reference(&c, &mut buf[skew..], off);
                        // Copied writes and reads elsewhere on the same connections.
                        let small = vec![t ^ i; 512];
                        let small_off = u64::from(t) * (16 << 20) + (12 << 20);
                        c.write_at(&small, small_off, WriteFlags::default())
                            .unwrap();
                        let mut back = vec![0u8; len];
                        c.read_at(&mut back, off).unwrap();
                        assert!(back == want, "thread {t}, write {i} of {len} bytes");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Page-aligned data, as the node sends it: the request header takes a pipe slot,
        // so a whole 1 MiB of pages goes in two rounds.
        let mut aligned = crate::sys::AlignedBuf::new_zeroed(1 << 20, 4096).unwrap();
        let page_data = aligned.as_mut_slice();
        for (k, b) in page_data.iter_mut().enumerate() {
            *b = pattern(k, 9, 9);
        }
        write_by_reference(&c, page_data, 60 << 20);
        let mut back = vec![0u8; 1 << 20];
        c.read_at(&mut back, 60 << 20).unwrap();
        assert!(back.iter().enumerate().all(|(k, &b)| b == pattern(k, 9, 9)));
        // Straight from the device as well (not only through the client).
        let mut last = vec![0u8; 3 << 20];
        mem.read_at(&mut last, 3 * (16 << 20) + 7 * 4097).unwrap();
        assert!(last.iter().enumerate().all(|(k, &b)| b == pattern(k, 3, 7)));
    }

    /// Byte `k` of write `i` of thread `t` in the test above.
    fn pattern(k: usize, t: u8, i: u8) -> u8 {
        u8::try_from((k * 7 + usize::from(t) * 13 + usize::from(i)) % 251).unwrap()
    }

    #[test]
    fn a_write_by_reference_without_reply_reports_the_path_lost() {
        let (server, h) = flaky_server("by-ref-timeout", 4 << 20);
        let options = NbdClientOptions {
            request_timeout_ms: 300,
            ..NbdClientOptions::default()
        };
        let c = NbdClient::open(&server.uri(), options).unwrap();
        h.hang(OpClass::Write);
        let (tx, rx) = std::sync::mpsc::channel();
        let data = vec![7u8; 1 << 20];
        assert!(c
            .submit_write_by_reference(&data, 0, Box::new(move |r| tx.send(r).unwrap()))
            .is_ok());
        let r = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert!(matches!(r, Ok(Err(BlockError::PathLost { .. }))), "{r:?}");
        // The blocking path reconnects; the next by-reference write goes through a new
        // connection's pipe.
        h.heal();
        c.write_at(&[1u8; 4096], 0, WriteFlags::default()).unwrap();
        let mut data = vec![9u8; 1 << 20];
        write_by_reference(&c, &mut data, 1 << 20);
        let mut back = vec![0u8; 1 << 20];
        c.read_at(&mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&b| b == 9));
        // A closed client starts nothing.
        c.close();
        assert!(c
            .submit_write_by_reference(&[0; 512], 0, Box::new(|_| {}))
            .is_err());
    }

    #[test]
    fn async_request_without_reply_times_out() {
        let (server, h) = flaky_server("async-timeout", 1 << 20);
        let options = NbdClientOptions {
            request_timeout_ms: 300,
            ..NbdClientOptions::default()
        };
        let c = NbdClient::open(&server.uri(), options).unwrap();
        h.hang(OpClass::Read);
        let (tx, rx) = std::sync::mpsc::channel();
        let read = crate::AsyncIo::Read {
            offset_bytes: 0,
            len_bytes: 4096,
        };
        let started = std::time::Instant::now();
        assert!(c
            .submit(read, Box::new(move |r| tx.send(r).unwrap()))
            .is_ok());
        let r = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert!(matches!(r, Ok(Err(BlockError::PathLost { .. }))), "{r:?}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        // The blocking path reconnects and is served once the device answers again.
        h.heal();
        let mut back = [1u8; 4096];
        c.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    /// Restarts the server of `c` on the same socket and device, and waits until `c` has
    /// replaced every connection the restart cut (reads visit every slot).
    fn restart_under(
        c: &NbdClient,
        server: ServerHandle,
        mem: &Arc<MemDevice>,
        name: &str,
    ) -> ServerHandle {
        server.shutdown().unwrap();
        let listen = ListenAddr::Unix(sock(name));
        let server = serve_device(mem.clone(), &listen, ServeOptions::default()).unwrap();
        let want = c.reconnect_count() + c.connection_count() as u64;
        let t = std::time::Instant::now();
        let mut buf = [0u8; 512];
        while c.reconnect_count() < want {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "no reconnect"
            );
            c.read_at(&mut buf, 0).unwrap();
        }
        server
    }

    #[test]
    fn writes_acknowledged_on_a_lost_connection_fail_a_flush_since_before_them() {
        let name = "loss";
        let (server, mem, c) = mem_server(name, 4 << 20);
        // Covered by a flush, or written with FUA, before the connections are lost: no loss.
        let mark = c.write_loss_count();
        c.write_at(&[1; 4096], 0, WriteFlags::default()).unwrap();
        c.flush().unwrap();
        c.write_at(&[2; 4096], 4096, WriteFlags::FUA).unwrap();
        let server = restart_under(&c, server, &mem, name);
        assert_eq!(c.write_loss_count(), mark);
        crate::flush_since(&c, mark).unwrap();

        // Acknowledged, then lost with the connections before any flush.
        let before = c.write_loss_count();
        c.write_at(&[3; 4096], 8192, WriteFlags::default()).unwrap();
        let server = restart_under(&c, server, &mem, name);
        let after = c.write_loss_count();
        assert!(after > before, "the loss was not counted");
        // Every caller whose writes began before the loss hears of it, however many
        // flushes ran since; the flush itself succeeds.
        c.flush().unwrap();
        for _ in 0..2 {
            let e = crate::flush_since(&c, before).unwrap_err();
            assert!(e.is_path_lost(), "{e}");
            assert!(format!("{e:#}").contains("flush"), "{e}");
        }
        // Writes begun after it do not.
        c.write_at(&[4; 4096], 12288, WriteFlags::default())
            .unwrap();
        crate::flush_since(&c, after).unwrap();
        // A connection that dies while a flush runs is noticed before the flush reads what
        // it covers: kill the server, then flush at once.
        let before = c.write_loss_count();
        c.write_at(&[5; 4096], 16384, WriteFlags::default())
            .unwrap();
        server.shutdown().unwrap();
        let listen = ListenAddr::Unix(sock(name));
        let server = serve_device(mem.clone(), &listen, ServeOptions::default()).unwrap();
        let t = std::time::Instant::now();
        // The flush may itself be cut (a flush in flight is never resent); once one goes
        // through, the loss is counted.
        while c.flush().is_err() {
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "no flush");
        }
        assert!(crate::flush_since(&c, before).is_err());
        drop(c);
        server.shutdown().unwrap();
    }

    #[test]
    fn many_threads_share_one_client() {
        let (_server, _mem, c) = mem_server("threads", 16 << 20);
        let c = Arc::new(c);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..64u64 {
                        let off = (u64::from(t) * 64 + i) * 4096;
                        let data =
                            vec![t.wrapping_mul(31).wrapping_add(u8::try_from(i).unwrap()); 4096];
                        c.write_at(&data, off, WriteFlags::default()).unwrap();
                        let mut back = vec![0u8; 4096];
                        c.read_at(&mut back, off).unwrap();
                        assert_eq!(back, data);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.flush().unwrap();
    }

    /// A read into `pipe` (after `head`, written first), waited for.
    fn pipe_read(
        c: &dyn BlockDevice,
        pipe: crate::Pipe,
        head: &[u8],
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, BlockError> {
        assert_eq!(pipe.write(head).unwrap(), head.len());
        let (tx, rx) = std::sync::mpsc::channel();
        if c.submit_read_to_pipe(offset, len, pipe, Box::new(move |r| tx.send(r).unwrap()))
            .is_err()
        {
            panic!("the NBD client refused a read into a pipe");
        }
        let pipe = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap()?;
        Ok(pipe.read_available().unwrap())
    }

    #[test]
    fn reads_into_a_pipe_carry_the_devices_bytes_after_the_callers_head() {
        for structured in [true, false] {
            let mem = Arc::new(MemDevice::new(8 << 20));
            let listen = ListenAddr::Unix(sock(&format!("pipe-{structured}")));
            let server = serve_device(mem.clone(), &listen, ServeOptions::default()).unwrap();
            let copts = NbdClientOptions {
                structured_replies: structured,
                ..Default::default()
            };
            let c = Arc::new(NbdClient::open(&server.uri(), copts).unwrap());
            let img: Vec<u8> = (0..8u32 << 20)
                .map(|i| u8::try_from(i.wrapping_mul(2_654_435_761) >> 24).unwrap())
                .collect();
            c.write_at(&img, 0, WriteFlags::default()).unwrap();
            // Buffered reads run beside the pipe reads on the same connections, so replies
            // of both kinds interleave in each connection's stream.
            let other = {
                let (c, img) = (c.clone(), img.clone());
                std::thread::spawn(move || {
                    for i in 0..400usize {
                        let (at, n) = ((i * 7919 * 512) % (7 << 20), 1 + (i * 613) % 70_000);
                        let mut back = vec![0u8; n];
                        c.read_at(&mut back, at as u64).unwrap();
                        assert!(back[..] == img[at..at + n]);
                    }
                })
            };
            for (i, len) in [1u32, 4096, 65_536, 100_000, 1 << 20, 3, 777_777, 1 << 20]
                .into_iter()
                .cycle()
                .take(40)
                .enumerate()
            {
                let n = usize::try_from(len).unwrap();
                let at = (i * 1_234_567) % ((8 << 20) - n);
                let head = [u8::try_from(i).unwrap(); 16];
                let pipe = crate::Pipe::new(4 << 20).unwrap();
                let got = pipe_read(c.as_ref(), pipe, &head, at as u64, len).unwrap();
                assert_eq!(got.len(), 16 + n, "read {i}: length");
                assert_eq!(got[..16], head, "read {i}: the head comes first, unchanged");
                assert!(
                    got[16..] == img[at..at + n],
                    "read {i} of {len} at {at} (structured {structured}) differs"
                );
            }
            other.join().unwrap();
            assert_eq!(c.reconnect_count(), 0);
            drop(c);
            server.shutdown().unwrap();
        }
    }

    #[test]
    fn a_read_that_overflows_its_pipe_is_dropped_and_the_connection_goes_on() {
        let (server, mem, c) = mem_server("pipe-small", 4 << 20);
        let img: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        c.write_at(&img, 0, WriteFlags::default()).unwrap();
        assert!(c.pipe_read_max_bytes() >= 1 << 20);
        // The smallest pipe the kernel makes has one slot.
        let tiny = crate::Pipe::new(4096).unwrap();
        assert!(tiny.capacity_bytes() < 1 << 20);
        assert!(matches!(
            pipe_read(&c, tiny, &[], 4096, 1 << 20),
            Err(BlockError::Unsupported { .. })
        ));
        // The dropped data was consumed: what follows on the stream is read right.
        let mut back = vec![0u8; 300_000];
        c.read_at(&mut back, 12_345).unwrap();
        assert!(back[..] == img[12_345..312_345]);
        // Reads into a pipe are now limited below what fitted, so that larger ones are
        // not read twice every time; those within the limit still work.
        let limit = c.pipe_read_max_bytes();
        assert!(limit > 0 && limit < 1 << 20, "limit {limit}");
        let big = crate::Pipe::new(4 << 20).unwrap();
        let got = pipe_read(&c, big, &[], 3 << 20, limit).unwrap();
        assert!(got[..] == img[3 << 20..(3 << 20) + usize::try_from(limit).unwrap()]);
        let big = crate::Pipe::new(4 << 20).unwrap();
        let refused = c.submit_read_to_pipe(0, limit + 1, big, Box::new(|_| {}));
        assert!(refused.is_err(), "a read over the limit was taken");
        assert_eq!(c.reconnect_count(), 0);
        assert_eq!(mem.image()[..], img[..]);
        drop(c);
        server.shutdown().unwrap();
    }

    #[test]
    fn a_failed_read_into_a_pipe_reports_the_devices_error() {
        let (server, h) = flaky_server("pipe-eio", 1 << 20);
        let c = NbdClient::open(&server.uri(), NbdClientOptions::default()).unwrap();
        h.fail_nth(OpClass::Read, 1, FailKind::Device(libc::EIO));
        let pipe = crate::Pipe::new(1 << 20).unwrap();
        assert!(matches!(
            pipe_read(&c, pipe, &[], 0, 65_536),
            Err(BlockError::Device { .. })
        ));
        let pipe = crate::Pipe::new(1 << 20).unwrap();
        assert_eq!(
            pipe_read(&c, pipe, &[], 0, 65_536).unwrap(),
            vec![0u8; 65_536]
        );
        drop(c);
        server.shutdown().unwrap();
    }

    /// A proxy between a client and `server` that forwards everything until `cut` is set;
    /// from then on it forwards `budget` more bytes from the server and closes both sides.
    fn cutting_proxy(
        name: &str,
        server: std::path::PathBuf,
        cut: Arc<std::sync::atomic::AtomicBool>,
        budget: usize,
    ) -> std::path::PathBuf {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let path = sock(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut client, _) = listener.accept().unwrap();
            let mut upstream = UnixStream::connect(&server).unwrap();
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
            });
            let mut buf = vec![0u8; 4096];
            let mut left = budget;
            loop {
                let n = match upstream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let n = if cut.load(std::sync::atomic::Ordering::SeqCst) {
                    let k = n.min(left);
                    left -= k;
                    k
                } else {
                    n
                };
                if client.write_all(&buf[..n]).is_err() || left == 0 {
                    break;
                }
            }
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = upstream.shutdown(std::net::Shutdown::Both);
        });
        path
    }

    #[test]
    fn a_connection_lost_in_the_middle_of_a_reply_still_ends_that_request() {
        // Each asynchronous read's completion must run, with "path lost", when the
        // connection dies while its data is being received: a dropped completion would
        // leave its caller waiting for good.
        for pipe in [false, true] {
            let (server, mem, _c) = mem_server(&format!("mid-{pipe}"), 4 << 20);
            mem.write_at(&vec![7u8; 4 << 20], 0, WriteFlags::default())
                .unwrap();
            let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let upstream = sock(&format!("mid-{pipe}"));
            let proxy = cutting_proxy(&format!("mid-proxy-{pipe}"), upstream, cut.clone(), 100_000);
            let uri = format!("nbd+unix:///?socket={}", proxy.display());
            let opts = NbdClientOptions {
                connections: 1,
                reconnect_timeout_ms: 0,
                ..Default::default()
            };
            let c = NbdClient::open(&uri, opts).unwrap();
            cut.store(true, std::sync::atomic::Ordering::SeqCst);
            let (tx, rx) = std::sync::mpsc::channel::<Result<usize, BlockError>>();
            if pipe {
                let p = crate::Pipe::new(4 << 20).unwrap();
                let done = Box::new(move |r: Result<crate::Pipe, BlockError>| {
                    tx.send(r.map(|_| 0)).unwrap();
                });
                assert!(c.submit_read_to_pipe(0, 1 << 20, p, done).is_ok());
            } else {
                let done = Box::new(move |r: Result<Vec<u8>, BlockError>| {
                    tx.send(r.map(|b| b.len())).unwrap();
                });
                let io = crate::AsyncIo::Read {
                    offset_bytes: 0,
                    len_bytes: 1 << 20,
                };
                assert!(c.submit(io, done).is_ok());
            }
            let r = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("the completion ran");
            assert!(
                matches!(r, Err(BlockError::PathLost { .. })),
                "pipe {pipe}: {r:?}"
            );
            drop(c);
            server.shutdown().unwrap();
        }
    }
}
