//! Safetensors files (one or several shards), memory-mapped, headers checked against the file
//! sizes.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::gguf::release_pages;

/// Memory-mapped safetensors files (one model, possibly sharded) with a tensor index.
pub(crate) struct StFiles {
    maps: Vec<memmap2::Mmap>,
    index: HashMap<String, StEntry>,
}

pub(crate) struct StEntry {
    pub(crate) file: usize,
    pub(crate) dtype: safetensors::Dtype,
    pub(crate) shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl StFiles {
    /// Maps and indexes the files; the first file naming a tensor wins.
    pub(crate) fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: a read-only map of a file we do not modify.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| Error::weights(path, "", format!("invalid safetensors file: {e}")))?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                if base + b > map.len() || a > b {
                    return Err(Error::weights(path, &name, "data lies outside the file"));
                }
                index.entry(name).or_insert(StEntry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + a,
                    end: base + b,
                });
            }
            maps.push(map);
        }
        Ok(StFiles { maps, index })
    }

    /// Every tensor name, sorted.
    pub(crate) fn names(&self) -> Vec<&String> {
        let mut v: Vec<&String> = self.index.keys().collect();
        v.sort();
        v
    }

    pub(crate) fn get(&self, name: &str) -> Option<&StEntry> {
        self.index.get(name)
    }

    pub(crate) fn data(&self, e: &StEntry) -> &[u8] {
        &self.maps[e.file][e.start..e.end]
    }

    pub(crate) fn release(&self, e: &StEntry) {
        release_pages(&self.maps[e.file], e.start, e.end - e.start);
    }
}

pub(crate) fn st_to_f32(bytes: &[u8], dtype: safetensors::Dtype) -> Vec<f32> {
    match dtype {
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}
