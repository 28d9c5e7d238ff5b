//! Reading checkpoint tensors (one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`) and handing them to layers, either as plain frozen
//! tensors or, for full fine-tuning, as `Var`s registered in a [`VarMap`].

use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Loads every tensor of the model's safetensors file(s) in `folder`, converted to `dtype`.
pub fn load_safetensors(
    folder: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in safetensors_files(folder)? {
        let loaded = candle_core::safetensors::load(&file, device).map_err(|e| {
            ModelError::Invalid(format!("{}: cannot read safetensors: {e}", file.display()))
        })?;
        for (name, tensor) in loaded {
            tensors.insert(name, tensor.to_dtype(dtype)?);
        }
    }
    Ok(tensors)
}

/// The weight files of a folder: `model.safetensors`, or the shards its index names.
pub fn safetensors_files(folder: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = folder.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = folder.join("model.safetensors.index.json");
    if !index_path.exists() {
        return Err(ModelError::MissingFile {
            path: single,
            hint: "expected model.safetensors or model.safetensors.index.json with its shards \
                   (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)"
                .into(),
        });
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index_path.clone(),
            source,
        })?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            ModelError::Invalid(format!("{}: no `weight_map` object", index_path.display()))
        })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let mut files = Vec::new();
    for shard in shards {
        let path = folder.join(shard);
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path,
                hint: format!("the shard is listed in {}", index_path.display()),
            });
        }
        files.push(path);
    }
    Ok(files)
}

/// Hands checkpoint tensors to layers by HF name, checking shapes. With a `VarMap`,
/// every tensor handed out becomes a trainable `Var` registered under its HF name.
pub struct WeightSource<'a> {
    tensors: HashMap<String, Tensor>,
    trainable: Option<&'a VarMap>,
}

impl<'a> WeightSource<'a> {
    pub fn new(tensors: HashMap<String, Tensor>, trainable: Option<&'a VarMap>) -> Self {
        WeightSource { tensors, trainable }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if tensor.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        match self.trainable {
            None => Ok(tensor.clone()),
            Some(varmap) => {
                let var = Var::from_tensor(tensor)?;
                let as_tensor = var.as_tensor().clone();
                let mut data = varmap
                    .data()
                    .lock()
                    .map_err(|_| ModelError::Invalid("the VarMap lock is poisoned".into()))?;
                data.insert(name.to_string(), var);
                Ok(as_tensor)
            }
        }
    }

    /// `Some(tensor)` when `present`, else `None` (for optional biases).
    pub fn get_if(&self, present: bool, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if present {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}
