//! The read buffer of a connection's reply reader: a buffered reader (like std's
//! `BufReader`) whose next fills can be held to a few bytes.
//!
//! A large read's data is spliced from the socket into a pipe, and whatever of it a fill
//! took into the buffer together with the reply's header has to be copied out of the
//! buffer into that pipe instead: up to a whole buffer (64 KiB) of a 1 MiB read taken in
//! and out of this process again. While replies to such reads are expected, the reader
//! [`caps`](ReplyBuf::cap) the fills to the size of a reply header, so the buffer takes the
//! header and the data stays in the socket for the splice. Small replies are still taken
//! many at a time by uncapped fills.

use std::io::{self, BufRead, Read};

/// A buffered reader over `R` with a cap on the bytes its next fills may take.
#[derive(Debug)]
pub(crate) struct ReplyBuf<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Consumed up to here.
    pos: usize,
    /// Filled up to here.
    end: usize,
    /// Bytes the next fills may take in all; uncapped when 0.
    cap: usize,
}

impl<R: Read> ReplyBuf<R> {
    /// A reader over `inner` with a buffer of `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize, inner: R) -> Self {
        ReplyBuf {
            inner,
            buf: vec![0; capacity.max(1)].into_boxed_slice(),
            pos: 0,
            end: 0,
            cap: 0,
        }
    }

    /// From now on fills take at most `bytes` bytes in all (0: no cap), after which they
    /// take what the buffer holds again. Bytes buffered already stay.
    pub(crate) fn cap(&mut self, bytes: usize) {
        self.cap = bytes;
    }

    /// The buffered bytes not consumed yet.
    pub(crate) fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// The underlying reader.
    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }
}

impl<R: Read> BufRead for ReplyBuf<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.end {
            let room = match self.cap {
                0 => self.buf.len(),
                cap => cap.min(self.buf.len()),
            };
            let n = self.inner.read(&mut self.buf[..room])?;
            self.cap = self.cap.saturating_sub(n);
            (self.pos, self.end) = (0, n);
        }
        Ok(self.buffer())
    }

    fn consume(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.end);
    }
}

impl<R: Read> Read for ReplyBuf<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // A read at least as large as the buffer skips it while nothing is buffered.
        if self.pos == self.end && self.cap == 0 && out.len() >= self.buf.len() {
            return self.inner.read(out);
        }
        let have = self.fill_buf()?;
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A reader that records the size of every read asked of it.
    struct Recorder {
        data: VecDeque<u8>,
        asked: Vec<usize>,
    }

    impl Read for Recorder {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.asked.push(out.len());
            self.data.read(out)
        }
    }

    /// 0, 1, ... 255, 0, 1, ...: `len` bytes.
    fn bytes(len: usize) -> Vec<u8> {
        (0..=255u8).cycle().take(len).collect()
    }

    fn reader(len: usize) -> ReplyBuf<Recorder> {
        let data = bytes(len).into();
        let rec = Recorder {
            data,
            asked: Vec::new(),
        };
        ReplyBuf::with_capacity(64, rec)
    }

    #[test]
    fn a_cap_holds_the_fills_to_a_header_and_then_lifts() {
        let mut r = reader(1000);
        r.cap(28);
        let mut head = [0u8; 20];
        r.read_exact(&mut head).unwrap();
        // One fill of 28 bytes: the 8 after the first 20 are buffered, nothing more.
        assert_eq!(r.get_ref().asked, vec![28]);
        assert_eq!(r.buffer(), &bytes(28)[20..]);
        let mut at = [0u8; 8];
        r.read_exact(&mut at).unwrap();
        assert!(r.buffer().is_empty());
        // The rest is in the source, for the caller to take past the buffer.
        assert_eq!(r.get_ref().data.len(), 1000 - 28);
        // The cap is used up: the next fill takes a whole buffer.
        r.fill_buf().unwrap();
        assert_eq!(r.get_ref().asked, vec![28, 64]);
        assert_eq!(r.buffer().len(), 64);
        assert_eq!(r.buffer()[0], 28);
    }

    #[test]
    fn a_short_fill_under_a_cap_leaves_the_rest_of_the_cap() {
        let mut r = reader(1000);
        r.cap(28);
        let mut b = [0u8; 10];
        // Reads of 10 go through the buffer: the first fill takes all 28.
        r.read_exact(&mut b).unwrap();
        r.consume(18);
        r.cap(40);
        r.fill_buf().unwrap();
        assert_eq!(r.buffer().len(), 40);
        r.consume(30);
        r.fill_buf().unwrap();
        assert_eq!(
            r.buffer().len(),
            10,
            "the buffered rest is served before any fill"
        );
        assert_eq!(r.get_ref().asked, vec![28, 40]);
    }

    #[test]
    fn uncapped_reads_are_buffered_like_std_and_large_ones_skip_the_buffer() {
        let mut r = reader(1000);
        let mut all = Vec::new();
        let mut small = [0u8; 5];
        r.read_exact(&mut small).unwrap();
        all.extend_from_slice(&small);
        assert_eq!(r.get_ref().asked, vec![64]);
        let mut rest = vec![0u8; 59];
        r.read_exact(&mut rest).unwrap();
        all.extend_from_slice(&rest);
        let mut big = vec![0u8; 100];
        r.read_exact(&mut big).unwrap();
        all.extend_from_slice(&big);
        assert_eq!(r.get_ref().asked, vec![64, 100]);
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).unwrap();
        all.extend_from_slice(&tail);
        assert_eq!(all, bytes(1000));
    }
}
