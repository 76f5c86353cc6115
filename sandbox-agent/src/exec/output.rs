//! A bounded per-exec output buffer.
//!
//! The agent always drains a command's pipes (a command never blocks on a full
//! pipe because a client reads slowly); what it keeps is bounded: the first
//! `head_cap` bytes and the last `tail_cap` bytes. Bytes in between are
//! dropped and readers are told exactly which range is gone. Offsets count
//! every byte of stdout and stderr together, in the order they were read.

use std::collections::VecDeque;

use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub stream: Stream,
    pub offset: u64,
    pub data: Bytes,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

#[derive(Debug, Clone)]
pub enum Item {
    Chunk(Chunk),
    /// Bytes `[from, to)` were produced but are no longer buffered.
    Dropped {
        from: u64,
        to: u64,
    },
}

#[derive(Debug)]
pub struct OutputBuffer {
    head: Vec<Chunk>,
    head_len: usize,
    head_cap: usize,
    tail: VecDeque<Chunk>,
    tail_len: usize,
    tail_cap: usize,
    /// Every byte ever appended.
    total: u64,
}

impl OutputBuffer {
    /// A buffer that keeps at most `cap` bytes: half head, half tail.
    pub fn new(cap: usize) -> Self {
        let head_cap = cap / 2;
        Self {
            head: Vec::new(),
            head_len: 0,
            head_cap,
            tail: VecDeque::new(),
            tail_len: 0,
            tail_cap: cap - head_cap,
            total: 0,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.head_len + self.tail_len
    }

    /// Bytes that were produced but are no longer held.
    pub fn dropped(&self) -> u64 {
        self.total - (self.head_len + self.tail_len) as u64
    }

    pub fn append(&mut self, stream: Stream, mut data: Bytes) {
        if data.is_empty() {
            return;
        }
        let room = self.head_cap - self.head_len;
        if room > 0 {
            let take = room.min(data.len());
            let part = data.split_to(take);
            self.head.push(Chunk {
                stream,
                offset: self.total,
                data: part,
            });
            self.head_len += take;
            self.total += take as u64;
        }
        if data.is_empty() {
            return;
        }
        // Only the last tail_cap bytes of an oversized write can be kept.
        if data.len() > self.tail_cap {
            let skip = data.len() - self.tail_cap;
            self.total += skip as u64;
            data = data.slice(skip..);
            self.tail.clear();
            self.tail_len = 0;
        }
        let len = data.len();
        self.tail.push_back(Chunk {
            stream,
            offset: self.total,
            data,
        });
        self.tail_len += len;
        self.total += len as u64;
        while self.tail_len > self.tail_cap {
            let excess = self.tail_len - self.tail_cap;
            let front = self.tail.front_mut().expect("tail_len > 0");
            if front.data.len() <= excess {
                self.tail_len -= front.data.len();
                self.tail.pop_front();
            } else {
                front.data = front.data.slice(excess..);
                front.offset += excess as u64;
                self.tail_len -= excess;
            }
        }
    }

    /// Items at or after `from`, at most about `max_bytes` of data. The
    /// returned offset is where the next read should start.
    pub fn read_from(&self, from: u64, max_bytes: usize) -> (Vec<Item>, u64) {
        let mut items = Vec::new();
        let mut pos = from;
        let mut budget = max_bytes;
        for chunk in self.head.iter().chain(self.tail.iter()) {
            if budget == 0 {
                break;
            }
            if chunk.end() <= pos {
                continue;
            }
            if chunk.offset > pos {
                items.push(Item::Dropped {
                    from: pos,
                    to: chunk.offset,
                });
                pos = chunk.offset;
            }
            let start = (pos - chunk.offset) as usize;
            let take = (chunk.data.len() - start).min(budget);
            items.push(Item::Chunk(Chunk {
                stream: chunk.stream,
                offset: pos,
                data: chunk.data.slice(start..start + take),
            }));
            pos += take as u64;
            budget -= take;
        }
        // Everything held was before `pos` but more was produced since (the
        // reader is inside a dropped range at the very end).
        if items.is_empty() && pos < self.total && self.tail.is_empty() {
            items.push(Item::Dropped {
                from: pos,
                to: self.total,
            });
            pos = self.total;
        }
        (items, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(buf: &OutputBuffer, from: u64) -> (Vec<u8>, Vec<(u64, u64)>) {
        let mut data = Vec::new();
        let mut gaps = Vec::new();
        let mut pos = from;
        loop {
            let (items, next) = buf.read_from(pos, 7);
            if items.is_empty() {
                break;
            }
            for item in items {
                match item {
                    Item::Chunk(c) => data.extend_from_slice(&c.data),
                    Item::Dropped { from, to } => gaps.push((from, to)),
                }
            }
            pos = next;
        }
        (data, gaps)
    }

    #[test]
    fn keeps_everything_under_the_cap() {
        let mut b = OutputBuffer::new(100);
        b.append(Stream::Stdout, Bytes::from_static(b"hello "));
        b.append(Stream::Stderr, Bytes::from_static(b"world"));
        assert_eq!(collect(&b, 0), (b"hello world".to_vec(), vec![]));
        assert_eq!(collect(&b, 6).0, b"world");
        assert_eq!(b.dropped(), 0);
    }

    #[test]
    fn keeps_head_and_tail_and_marks_the_gap() {
        let mut b = OutputBuffer::new(10);
        for i in 0..100u8 {
            b.append(Stream::Stdout, Bytes::from(vec![i]));
        }
        let (data, gaps) = collect(&b, 0);
        assert_eq!(data, [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]);
        assert_eq!(gaps, [(5, 95)]);
        assert_eq!(b.total(), 100);
        assert_eq!(b.dropped(), 90);
        // A reader that resumes inside the dropped range learns the gap too.
        assert_eq!(collect(&b, 50), (vec![95, 96, 97, 98, 99], vec![(50, 95)]));
    }

    #[test]
    fn one_huge_write_keeps_its_ends() {
        let mut b = OutputBuffer::new(8);
        let data: Vec<u8> = (0..=255).collect();
        b.append(Stream::Stdout, Bytes::from(data));
        let (got, gaps) = collect(&b, 0);
        assert_eq!(got, [0, 1, 2, 3, 252, 253, 254, 255]);
        assert_eq!(gaps, [(4, 252)]);
    }
}
