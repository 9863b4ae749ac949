//! What read-ahead holds: the bytes of the frames it read, copied into blocks of its own.
//!
//! A frame is not kept as it came. hyper slices each frame out of its connection's read
//! buffer, so a kept frame keeps that buffer's whole allocation alive, and a body sent as
//! one-byte chunks would pin a read buffer, a `Frame` and a queue slot per byte: about a
//! hundred times what the bytes count. Copying every frame into blocks makes what the budget
//! counts the memory that is held: the blocks' capacity, nothing else of any size.

use std::collections::VecDeque;
use std::mem;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;

/// The most a block is allocated with for small frames: a frame larger than that gets a
/// block of its own size.
pub(crate) const BLOCK: usize = 16 * 1024;

/// The first block of a request, for small frames: each next one is twice the last, up to
/// [`BLOCK`], so a body of a few bytes takes a small block, and a long one few allocations.
pub(crate) const FIRST_BLOCK: usize = 1024;

/// The block being filled, checked out of the state with the body while the body is polled
/// (the copy runs outside the state's lock: `Buf` is user code).
#[derive(Debug, Default)]
pub(crate) struct Tail {
    block: BytesMut,
    /// Blocks filled while checked out, to be queued when put back.
    filled: Vec<Bytes>,
    /// Data bytes copied in while checked out.
    copied: usize,
    /// The capacity of the last block allocated.
    last: usize,
}

impl Tail {
    /// Copies `data` in: into the block's spare room, then into new blocks. `room` is what the
    /// request may still take when it checked the tail out (its limit, the budget it
    /// reserved, the body's size hint). A new block is as large as what remains of the frame
    /// or, for a smaller rest, twice the last block (from [`FIRST_BLOCK`] up to [`BLOCK`]) but
    /// no more than what remains of the room: so no block reaches past the room, but to hold a
    /// frame.
    pub(crate) fn copy(&mut self, mut data: impl Buf, room: usize) {
        while data.has_remaining() {
            let spare = self.block.capacity() - self.block.len();
            if spare == 0 {
                let rest = data.remaining();
                let next = (self.last * 2).clamp(FIRST_BLOCK, BLOCK);
                let room = room.saturating_sub(self.copied).min(next);
                let fresh = BytesMut::with_capacity(rest.max(room));
                self.last = fresh.capacity();
                let full = mem::replace(&mut self.block, fresh);
                if !full.is_empty() {
                    self.filled.push(full.freeze());
                }
                continue;
            }
            let chunk = data.chunk();
            if chunk.is_empty() {
                // A `Buf` whose `remaining` and `chunk` disagree: take what it gave.
                break;
            }
            let n = chunk.len().min(spare);
            self.block.extend_from_slice(&chunk[..n]);
            self.copied += n;
            data.advance(n);
        }
    }

    /// The room left in the block being filled (counted already).
    pub(crate) fn spare(&self) -> usize {
        self.block.capacity() - self.block.len()
    }

    /// The capacity [`copy`](Self::copy) allocates for `len` more bytes within `room`: none
    /// if they fit in the spare room, else one block (see `copy`).
    pub(crate) fn block_for(&self, len: usize, room: usize) -> usize {
        let spare = self.spare();
        if len <= spare {
            return 0;
        }
        let next = (self.last * 2).clamp(FIRST_BLOCK, BLOCK);
        (len - spare).max(room.saturating_sub(spare).min(next))
    }

    /// The memory the tail holds: its block's capacity and the blocks it filled.
    fn memory(&self) -> usize {
        self.block.capacity() + self.filled.iter().map(Bytes::len).sum::<usize>()
    }
}

/// The read-ahead data not yet handed to the handler, in order: full blocks, the tail, then
/// the trailers (a body's last frame).
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    full: VecDeque<Bytes>,
    /// The bytes in `full` (each block is full: its length is its capacity), kept so that
    /// [`memory`](Self::memory), asked after every frame, does not walk the blocks.
    full_memory: usize,
    /// `None` while checked out.
    tail: Option<Tail>,
    pub(crate) trailers: Option<HeaderMap>,
    /// Data bytes held.
    pub(crate) len: usize,
}

impl Buffer {
    pub(crate) fn new() -> Self {
        Self {
            tail: Some(Tail::default()),
            ..Self::default()
        }
    }

    /// The memory held: what the budget counts.
    pub(crate) fn memory(&self) -> usize {
        self.full_memory + self.tail.as_ref().map_or(0, Tail::memory)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0 && self.trailers.is_none()
    }

    /// Takes the tail out, to fill it outside the lock.
    pub(crate) fn check_out(&mut self) -> Tail {
        self.tail.take().unwrap_or_default()
    }

    /// Puts the tail back; queues the blocks it filled and counts the bytes it copied.
    pub(crate) fn put_back(&mut self, mut tail: Tail) {
        self.full_memory += tail.filled.iter().map(Bytes::len).sum::<usize>();
        self.full.extend(tail.filled.drain(..));
        self.len += mem::take(&mut tail.copied);
        self.tail = Some(tail);
    }

    /// The next data for the handler, with the memory it gave back.
    pub(crate) fn pop_data(&mut self) -> Option<(Bytes, usize)> {
        let data = match self.full.pop_front() {
            Some(block) => {
                let memory = block.len();
                self.full_memory -= memory;
                (block, memory)
            }
            None => {
                let tail = self.tail.as_mut()?;
                if tail.block.is_empty() {
                    return None;
                }
                let memory = tail.block.capacity();
                (mem::take(&mut tail.block).freeze(), memory)
            }
        };
        self.len -= data.0.len();
        Some(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_filled_whole_and_never_past_the_room() {
        let mut buffer = Buffer::new();
        let mut tail = buffer.check_out();
        // One-byte frames share one block, sized by the room left (100 bytes).
        for _ in 0..60 {
            tail.copy(&b"x"[..], 100);
        }
        buffer.put_back(tail);
        assert_eq!((buffer.len, buffer.memory()), (60, 100));

        // A frame larger than the spare room fills it, then gets a block of its own size.
        let mut tail = buffer.check_out();
        tail.copy(&[7u8; 1000][..], 40);
        buffer.put_back(tail);
        assert_eq!((buffer.len, buffer.memory()), (1060, 100 + 960));

        // A small frame past the room gets a block of its own size, no more.
        let mut tail = buffer.check_out();
        tail.copy(&b"abc"[..], 0);
        buffer.put_back(tail);
        assert_eq!((buffer.len, buffer.memory()), (1063, 100 + 960 + 3));
        // A frame that fills part of the room leaves the rest of it for the next block.
        let mut tail = buffer.check_out();
        tail.copy(&b"abc"[..], 10);
        tail.copy(&b"defgh"[..], 10);
        buffer.put_back(tail);
        assert_eq!((buffer.len, buffer.memory()), (1071, 100 + 960 + 3 + 10));
        for _ in 0..2 {
            buffer.pop_data().unwrap();
        }
        assert_eq!(buffer.pop_data().unwrap().0, "abc");
        assert_eq!(buffer.pop_data().unwrap().0, "abcdefgh");
        assert_eq!(buffer.len, 0);

        assert!(buffer.pop_data().is_none());
        assert_eq!(buffer.memory(), 0);
        assert!(buffer.is_empty());
    }

    #[test]
    fn blocks_come_out_in_order_with_their_memory() {
        let mut buffer = Buffer::new();
        let mut tail = buffer.check_out();
        tail.copy(&b"x"[..], 100);
        tail.copy(&[7u8; 1000][..], 99);
        buffer.put_back(tail);
        let (first, memory) = buffer.pop_data().unwrap();
        assert_eq!((first.len(), memory), (100, 100));
        assert_eq!(&first[..2], b"x\x07");
        let (second, memory) = buffer.pop_data().unwrap();
        assert_eq!((second.len(), memory), (901, 901));
        assert!(buffer.pop_data().is_none());
        assert_eq!((buffer.len, buffer.memory()), (0, 0));
    }

    #[test]
    fn small_frames_take_blocks_that_double_up_to_the_largest() {
        let mut tail = Tail::default();
        tail.copy(&b"abc"[..], usize::MAX);
        assert_eq!(tail.memory(), FIRST_BLOCK, "a few bytes take a small block");
        let mut sizes = vec![tail.block.capacity()];
        for _ in 0..(2 * BLOCK) {
            tail.copy(&b"x"[..], usize::MAX);
            if tail.block.capacity() != *sizes.last().unwrap() {
                sizes.push(tail.block.capacity());
            }
        }
        assert_eq!(sizes, [1024, 2048, 4096, 8192, 16384]);
        // What `block_for` plans is what `copy` allocates.
        for (len, room) in [(1, usize::MAX), (20_000, usize::MAX), (5, 3), (100, 0)] {
            let mut tail = Tail::default();
            tail.copy(&[1u8; 3000][..], usize::MAX);
            let planned = tail.block_for(len, room);
            let before = tail.memory();
            tail.copy(&vec![2u8; len][..], room);
            assert_eq!(tail.memory() - before, planned, "{len} bytes, room {room}");
        }
        assert_eq!(tail.memory(), 3 + 2 * BLOCK + tail.spare());
    }
}
