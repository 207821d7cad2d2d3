//! [`MemDevice`]: a block device held in memory.

use parking_lot::RwLock;

use crate::{BlockDevice, BlockError, WriteFlags};

/// A block device held in memory. Every write is immediately "durable"; flush does nothing.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    block_size_bytes: u32,
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("in-memory device offsets fit in usize (checked by check_range)")
}

impl MemDevice {
    /// A zero-filled device of `size_bytes` with a 4 KiB block size.
    pub fn new(size_bytes: u64) -> MemDevice {
        MemDevice::from_image(vec![0; to_usize(size_bytes)])
    }

    /// A device whose contents are `image`.
    pub fn from_image(image: Vec<u8>) -> MemDevice {
        MemDevice {
            data: RwLock::new(image),
            block_size_bytes: 4096,
        }
    }

    /// Sets the preferred block size reported by [`BlockDevice::block_size_bytes`].
    pub fn with_block_size(mut self, block_size_bytes: u32) -> MemDevice {
        self.block_size_bytes = block_size_bytes;
        self
    }

    /// A copy of the whole contents.
    pub fn image(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    fn fill(
        &self,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
        byte: u8,
    ) -> Result<(), BlockError> {
        self.check_range(op, offset_bytes, len_bytes)?;
        let start = to_usize(offset_bytes);
        self.data.write()[start..start + to_usize(len_bytes)].fill(byte);
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        self.check_range("read", offset_bytes, buf.len() as u64)?;
        let start = to_usize(offset_bytes);
        buf.copy_from_slice(&self.data.read()[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        _flags: WriteFlags,
    ) -> Result<(), BlockError> {
        self.check_range("write", offset_bytes, buf.len() as u64)?;
        let start = to_usize(offset_bytes);
        self.data.write()[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.fill("write_zeroes", offset_bytes, len_bytes, 0)
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        // Trimmed contents are unspecified; zeros are the most useful choice for tests.
        self.fill("trim", offset_bytes, len_bytes, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_range() {
        let d = MemDevice::new(8192);
        d.write_at(&[1, 2, 3], 4095, WriteFlags::default()).unwrap();
        let mut b = [0u8; 5];
        d.read_at(&mut b, 4094).unwrap();
        assert_eq!(b, [0, 1, 2, 3, 0]);
        d.write_zeroes(4096, 1).unwrap();
        d.read_at(&mut b, 4094).unwrap();
        assert_eq!(b, [0, 1, 0, 3, 0]);
        assert!(matches!(
            d.read_at(&mut b, 8190),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_at(&b, u64::MAX - 1, WriteFlags::FUA),
            Err(BlockError::OutOfRange { .. })
        ));
    }
}
