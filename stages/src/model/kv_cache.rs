//! The inference-only decoder of generation: the model's weights laid out for
//! small-batch matmuls, the KV cache, and the cached forward that reads and extends it.
//!
//! A decode step multiplies a few rows by every weight once; what it costs besides
//! those FLOPs is overhead, and on the BENCH.md model that overhead was most of the
//! step: ~60 candle ops per layer on tiny tensors, and gemm repacking each transposed
//! weight `W^T` on every call. So, once per [`generate`](super::generate) call, LoRA
//! is merged into the weights and q|k|v and gate|up are fused (4 gemm calls per
//! layer), and then:
//! - activations are kept feature-major, x^T (features, tokens), so each linear layer
//!   is `W x^T` on two row-major operands: gemm computes it ~1.4x faster than
//!   `x W^T` at 32 rows, and nothing is transposed but q|k|v and the context;
//! - norms, RoPE, SiLU and attention run as plain loops over f32 slices;
//! - nothing is padded: a prefill feeds each prompt's own tokens, concatenated, and
//!   the cache keeps keys and values per (row, kv head), each row as long as its own
//!   sequence, reserved for the whole generation so appending never reallocates;
//!   finished rows are dropped by moving their vectors out.
//!
//! Everything is computed in f32 (whatever the model's dtype). The numbers equal the
//! training forward up to float rounding; the parity tests hold both to transformers.

use super::causal_lm::CausalLm;
use super::layers::Linear;
use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// Linear layers sharing an input, fused into one weight: `y = x W^T + b`.
struct FusedLinear {
    /// (out, in), f32, LoRA deltas merged; the checkpoint tensor itself when there is
    /// nothing to fuse, merge or convert.
    weight: Tensor,
    /// (out,), when any part has a bias (0 for the parts without).
    bias: Option<Vec<f32>>,
}

impl FusedLinear {
    fn new(parts: &[&Linear]) -> Result<Self> {
        let has_bias = parts.iter().any(|linear| linear.bias.is_some());
        let (mut weights, mut bias) = (Vec::new(), Vec::new());
        for linear in parts {
            let weight = match &linear.lora {
                Some(lora) => (&linear.weight + lora.merged_delta()?)?,
                None => linear.weight.clone(),
            }; // (out, in)
            weights.push(weight.to_dtype(DType::F32)?);
            if has_bias {
                match &linear.bias {
                    Some(b) => bias.extend(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => bias.extend(std::iter::repeat_n(0.0, linear.out_dim())),
                }
            }
        }
        let weight = match weights.as_slice() {
            [single] => single.clone(),
            _ => Tensor::cat(&weights, 0)?,
        };
        Ok(FusedLinear {
            weight,
            bias: has_bias.then_some(bias),
        })
    }

    /// Feature-major activations: x^T (in, n) → y^T = W x^T (out, n). Both operands
    /// are row-major as they lie, so gemm streams the weight without repacking it
    /// (`x W^T` would repack `W^T` on every call: ~1.4x slower at 32 rows).
    fn forward(&self, x_t: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        let in_dim = self.weight.dim(1)?;
        let x_t = Tensor::from_vec(x_t, (in_dim, n), self.weight.device())?;
        let mut y_t = self.weight.matmul(&x_t)?.flatten_all()?.to_vec1::<f32>()?; // (out, n)
        if let Some(bias) = &self.bias {
            for (row, b) in y_t.chunks_exact_mut(n).zip(bias) {
                row.iter_mut().for_each(|v| *v += b);
            }
        }
        Ok(y_t)
    }
}

struct InferenceLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    /// q | k | v: ((heads + 2 kv_heads) head_dim, hidden)
    qkv: FusedLinear,
    o: FusedLinear,
    /// gate | up: (2 intermediate, hidden)
    gate_up: FusedLinear,
    down: FusedLinear,
}

/// A snapshot of a [`CausalLm`] for cached inference; build one per generation, since
/// trainable weights change between calls.
pub struct InferenceModel {
    /// (vocab, hidden) in the model's dtype: rows are gathered, never copied whole.
    embed_tokens: Tensor,
    layers: Vec<InferenceLayer>,
    final_norm: Vec<f32>,
    eps: f32,
    /// (vocab, hidden)
    lm_head: FusedLinear,
    /// (head_dim / 2,)
    inv_freq: Vec<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    intermediate: usize,
}

/// The tokens of one forward call: `counts[row]` new tokens per row, concatenated
/// row after row (no padding anywhere), following `past[row]` cached ones.
struct Chunk {
    counts: Vec<usize>,
    past: Vec<usize>,
    /// Index of each row's first token in the concatenation.
    starts: Vec<usize>,
}

impl Chunk {
    fn new(counts: &[usize], past: &[usize]) -> Self {
        let starts = counts
            .iter()
            .scan(0, |start, &count| {
                let first = *start;
                *start += count;
                Some(first)
            })
            .collect();
        Chunk {
            counts: counts.to_vec(),
            past: past.to_vec(),
            starts,
        }
    }

    fn tokens(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The position id of every token: its index in its row.
    fn positions(&self) -> Vec<u32> {
        self.counts
            .iter()
            .zip(&self.past)
            .flat_map(|(&count, &past)| (past..past + count).map(|p| p as u32))
            .collect()
    }
}

impl InferenceModel {
    pub fn new(model: &CausalLm) -> Result<Self> {
        let norm = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        let layers = model
            .layers
            .iter()
            .map(|layer| {
                let (attention, mlp) = (&layer.self_attn, &layer.mlp);
                Ok(InferenceLayer {
                    input_norm: norm(&layer.input_layernorm.weight)?,
                    post_attention_norm: norm(&layer.post_attention_layernorm.weight)?,
                    qkv: FusedLinear::new(&[
                        &attention.q_proj,
                        &attention.k_proj,
                        &attention.v_proj,
                    ])?,
                    o: FusedLinear::new(&[&attention.o_proj])?,
                    gate_up: FusedLinear::new(&[&mlp.gate_proj, &mlp.up_proj])?,
                    down: FusedLinear::new(&[&mlp.down_proj])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let config = &model.config;
        let lm_head = Linear {
            weight: model.lm_head.clone(),
            bias: None,
            lora: None,
        };
        Ok(InferenceModel {
            embed_tokens: model.embed_tokens.clone(),
            layers,
            final_norm: norm(&model.norm.weight)?,
            eps: model.norm.eps as f32,
            lm_head: FusedLinear::new(&[&lm_head])?,
            inv_freq: model.rope_inv_freq()?,
            heads: config.num_attention_heads,
            kv_heads: config.num_kv_heads(),
            head_dim: config.head_dim(),
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// An empty cache for `rows` rows holding up to `capacity[row]` positions each.
    pub fn new_cache(&self, capacity: &[usize]) -> KvCache {
        let reserved = || {
            capacity
                .iter()
                .flat_map(|&c| (0..self.kv_heads).map(move |_| c * self.head_dim))
                .map(Vec::with_capacity)
                .collect()
        };
        KvCache {
            layers: (0..self.layers.len())
                .map(|_| LayerCache {
                    keys: reserved(),
                    values: reserved(),
                })
                .collect(),
            lengths: vec![0; capacity.len()],
            kv_heads: self.kv_heads,
        }
    }

    /// Feeds `counts[row]` new tokens to each row of `cache` (`ids` holds them row
    /// after row, unpadded), extends the cache, and returns the logits (rows, vocab)
    /// of each row's last token, row-major. Every row needs at least one token.
    pub fn forward(&self, ids: &[u32], counts: &[usize], cache: &mut KvCache) -> Result<Vec<f32>> {
        let chunk = Chunk::new(counts, &cache.lengths);
        let n = chunk.tokens();
        if ids.len() != n || counts.len() != cache.lengths.len() || counts.contains(&0) {
            return Err(ModelError::Invalid(format!(
                "cached forward: {} ids for token counts {counts:?} of {} cached rows",
                ids.len(),
                cache.lengths.len()
            )));
        }
        let ids = Tensor::from_slice(ids, n, self.device())?;
        let x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?; // (n, hidden)
                                // Activations stay feature-major, (features, n), between the matmuls.
        let mut x_t = transpose(&x, n, self.hidden); // (hidden, n)
        let rope = self.rope_tables(&chunk.positions());
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            self.layer_forward(layer, layer_cache, &mut x_t, &chunk, &rope)?;
        }
        for (length, count) in cache.lengths.iter_mut().zip(counts) {
            *length += count;
        }
        let rows = counts.len();
        let last: Vec<usize> = (chunk.starts.iter().zip(counts))
            .map(|(start, count)| start + count - 1)
            .collect();
        let last_t: Vec<f32> = x_t
            .chunks_exact(n)
            .flat_map(|feature| last.iter().map(|&token| feature[token]))
            .collect(); // (hidden, rows)
        let normed_t = rms_norm_t(&last_t, &self.final_norm, self.eps);
        let logits_t = self.lm_head.forward(normed_t, rows)?; // (vocab, rows)
        Ok(transpose(&logits_t, logits_t.len() / rows, rows))
    }

    /// One decoder layer on feature-major x^T (hidden, n), in place; q|k|v and the
    /// attention context are turned token-major for attention only.
    fn layer_forward(
        &self,
        layer: &InferenceLayer,
        cache: &mut LayerCache,
        x_t: &mut [f32],
        chunk: &Chunk,
        (cos, sin): &(Vec<f32>, Vec<f32>),
    ) -> Result<()> {
        let n = chunk.tokens();
        let (d, inter) = (self.head_dim, self.intermediate);
        let normed_t = rms_norm_t(x_t, &layer.input_norm, self.eps);
        let qkv_t = layer.qkv.forward(normed_t, n)?; // ((heads + 2 kv_heads) d, n)
        let mut qkv = transpose(&qkv_t, qkv_t.len() / n, n); // (n, (heads + 2 kv_heads) d)
        self.rotate(&mut qkv, cos, sin);
        cache.append(&qkv, chunk, self.heads, self.kv_heads, d);
        let context = self.attend(&qkv, cache, chunk); // (n, heads * d)
        let context_t = transpose(&context, n, self.heads * d);
        add_into(x_t, &layer.o.forward(context_t, n)?);
        let normed_t = rms_norm_t(x_t, &layer.post_attention_norm, self.eps);
        let gate_up_t = layer.gate_up.forward(normed_t, n)?; // (2 inter, n)
        let (gate, up) = gate_up_t.split_at(inter * n);
        let act_t: Vec<f32> = (gate.iter().zip(up))
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u) // SiLU(gate) * up
            .collect(); // (inter, n)
        add_into(x_t, &layer.down.forward(act_t, n)?);
        Ok(())
    }

    /// cos and sin (n, head_dim) for each position, as transformers' rotate-half
    /// tables: `[f, f]` with `f = position * inv_freq` in f32.
    fn rope_tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::with_capacity(positions.len() * self.head_dim);
        let mut sin = Vec::with_capacity(positions.len() * self.head_dim);
        for &position in positions {
            let freqs: Vec<f32> = self.inv_freq.iter().map(|f| position as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
        (cos, sin)
    }

    /// Applies RoPE in place to the q and k heads of qkv (n, (heads + 2 kv_heads) d).
    fn rotate(&self, qkv: &mut [f32], cos: &[f32], sin: &[f32]) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let width = (self.heads + 2 * self.kv_heads) * d;
        for (i, token) in qkv.chunks_exact_mut(width).enumerate() {
            let (cos, sin) = (&cos[i * d..][..d], &sin[i * d..][..d]);
            for head in token[..(self.heads + self.kv_heads) * d].chunks_exact_mut(d) {
                for j in 0..half {
                    let (x1, x2) = (head[j], head[j + half]);
                    head[j] = x1 * cos[j] + -x2 * sin[j];
                    head[j + half] = x2 * cos[j + half] + x1 * sin[j + half];
                }
            }
        }
    }

    /// Attention of the chunk's queries over their row's cached keys, causal. The
    /// `n_rep` query heads that share a kv head are handled together, so each key and
    /// value is read once for all of them. Returns the context (n, heads * d).
    fn attend(&self, qkv: &[f32], cache: &LayerCache, chunk: &Chunk) -> Vec<f32> {
        let (heads, d) = (self.heads, self.head_dim);
        let width = (heads + 2 * self.kv_heads) * d;
        let n_rep = heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let longest = chunk.past.iter().zip(&chunk.counts).map(|(p, c)| p + c);
        let mut scores = vec![0.0f32; n_rep * longest.max().unwrap_or(0)]; // (n_rep, keys)
        let mut totals = vec![0.0f32; n_rep];
        let mut out = vec![0.0f32; chunk.tokens() * heads * d];
        for (row, (&start, &count)) in chunk.starts.iter().zip(&chunk.counts).enumerate() {
            for group in 0..self.kv_heads {
                let pair = row * self.kv_heads + group;
                let (keys, values) = (&cache.keys[pair], &cache.values[pair]);
                for step in 0..count {
                    let token = start + step;
                    let n = chunk.past[row] + step + 1; // visible keys
                                                        // Query heads group * n_rep .. (group + 1) * n_rep use this kv head.
                    let queries = &qkv[token * width + group * n_rep * d..][..n_rep * d];
                    for (j, key) in keys.chunks_exact(d).take(n).enumerate() {
                        for (r, query) in queries.chunks_exact(d).enumerate() {
                            scores[r * n + j] = dot(query, key) * scale;
                        }
                    }
                    for (r, total) in totals.iter_mut().enumerate() {
                        let row_scores = &mut scores[r * n..][..n];
                        let max = row_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        *total = 0.0;
                        for w in row_scores.iter_mut() {
                            *w = (*w - max).exp();
                            *total += *w;
                        }
                    }
                    let context = &mut out[(token * heads + group * n_rep) * d..][..n_rep * d];
                    for (j, value) in values.chunks_exact(d).take(n).enumerate() {
                        for (r, context) in context.chunks_exact_mut(d).enumerate() {
                            let p = scores[r * n + j] / totals[r];
                            context.iter_mut().zip(value).for_each(|(c, v)| *c += p * v);
                        }
                    }
                }
            }
        }
        out
    }
}

/// The KV cache of every layer for the rows still being generated.
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Positions cached per row.
    lengths: Vec<usize>,
    kv_heads: usize,
}

impl KvCache {
    /// A cache whose row i is a copy of row `rows[i]` of this one, with room for
    /// `room` more positions per row (rows that share a prompt start from one prefill).
    pub fn copy_rows(&self, rows: &[usize], room: usize) -> KvCache {
        let copy = |store: &[Vec<f32>]| -> Vec<Vec<f32>> {
            rows.iter()
                .flat_map(|&r| (0..self.kv_heads).map(move |g| (r, &store[r * self.kv_heads + g])))
                .map(|(r, source)| {
                    // `lengths[r]` positions of head_dim floats each.
                    let per_position = source.len() / self.lengths[r].max(1);
                    let mut copied = Vec::with_capacity(source.len() + room * per_position);
                    copied.extend_from_slice(source);
                    copied
                })
                .collect()
        };
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|layer| LayerCache {
                    keys: copy(&layer.keys),
                    values: copy(&layer.values),
                })
                .collect(),
            lengths: rows.iter().map(|&r| self.lengths[r]).collect(),
            kv_heads: self.kv_heads,
        }
    }

    /// Keeps only the rows listed in `rows`, in that order (finished rows are dropped).
    pub fn keep_rows(&mut self, rows: &[usize]) {
        for layer in self.layers.iter_mut() {
            layer.keys = take_rows(&mut layer.keys, rows, self.kv_heads);
            layer.values = take_rows(&mut layer.values, rows, self.kv_heads);
        }
        self.lengths = rows.iter().map(|&r| self.lengths[r]).collect();
    }
}

/// One layer's keys (after RoPE) and values, per (row, kv head): `len * head_dim` floats.
struct LayerCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl LayerCache {
    /// Appends the k and v heads of qkv (n, (heads + 2 kv_heads) d) to each token's row.
    fn append(&mut self, qkv: &[f32], chunk: &Chunk, heads: usize, kv_heads: usize, d: usize) {
        let width = (heads + 2 * kv_heads) * d;
        for (row, (&start, &count)) in chunk.starts.iter().zip(&chunk.counts).enumerate() {
            for token in qkv[start * width..(start + count) * width].chunks_exact(width) {
                for g in 0..kv_heads {
                    let pair = row * kv_heads + g;
                    self.keys[pair].extend_from_slice(&token[(heads + g) * d..][..d]);
                    self.values[pair].extend_from_slice(&token[(heads + kv_heads + g) * d..][..d]);
                }
            }
        }
    }
}

fn take_rows(store: &mut [Vec<f32>], rows: &[usize], kv_heads: usize) -> Vec<Vec<f32>> {
    rows.iter()
        .flat_map(|&r| (0..kv_heads).map(move |g| r * kv_heads + g))
        .map(|i| std::mem::take(&mut store[i]))
        .collect()
}

/// `weight * x / sqrt(mean(x^2) + eps)` per token of feature-major x^T (features, n),
/// summing squares in feature order as the training path's RmsNorm does per row.
fn rms_norm_t(x_t: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let n = x_t.len() / weight.len();
    let mut sum_squares = vec![0.0f32; n];
    for feature in x_t.chunks_exact(n) {
        sum_squares
            .iter_mut()
            .zip(feature)
            .for_each(|(s, v)| *s += v * v);
    }
    let rms: Vec<f32> = sum_squares
        .iter()
        .map(|s| (s / weight.len() as f32 + eps).sqrt())
        .collect();
    let mut out = Vec::with_capacity(x_t.len());
    for (feature, w) in x_t.chunks_exact(n).zip(weight) {
        out.extend(feature.iter().zip(&rms).map(|(v, r)| v / r * w));
    }
    out
}

/// The transpose of a row-major (rows, columns) matrix, in 16 x 16 tiles so that both
/// the reads and the writes stay within a few cache lines.
fn transpose(x: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let mut out = vec![0.0f32; x.len()];
    for row_start in (0..rows).step_by(TILE) {
        for column_start in (0..columns).step_by(TILE) {
            for r in row_start..(row_start + TILE).min(rows) {
                for c in column_start..(column_start + TILE).min(columns) {
                    out[c * rows + r] = x[r * columns + c];
                }
            }
        }
    }
    out
}

fn add_into(x: &mut [f32], delta: &[f32]) {
    x.iter_mut().zip(delta).for_each(|(a, b)| *a += b);
}

/// A dot product with eight independent accumulators, so the compiler can vectorise it
/// (a single running sum is a serial dependency chain it must keep in order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoraConfig, LoraTargets, Trainability};

    /// Deterministic, non-trivial values for a tensor of `dims`.
    fn pattern(dims: &[usize], scale: f32) -> Tensor {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * scale)
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    /// Qwen2 (q/k/v bias, tied embeddings) with grouped-query attention and a LoRA
    /// adapter on every linear, every bias and LoRA B non-zero.
    fn qwen2_with_lora() -> CausalLm {
        let config = crate::model::tiny_test_config("qwen2", true);
        let device = Device::Cpu;
        let mut model =
            CausalLm::random(config, 7, DType::F32, &device, Trainability::Frozen).unwrap();
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: LoraTargets::All("all-linear".into()),
            use_rslora: false,
        };
        model.add_lora(&lora, &candle_nn::VarMap::new(), 3).unwrap();
        for layer in model.layers.iter_mut() {
            for (_, linear) in layer.linears_mut() {
                if let Some(bias) = &linear.bias {
                    linear.bias = Some(pattern(bias.dims(), 0.05));
                }
                let adapter = linear.lora.as_mut().unwrap();
                adapter.b = pattern(adapter.b.dims(), 0.1);
            }
        }
        model
    }

    /// The last-position logits of the training forward on one unpadded sequence.
    fn reference_logits(model: &CausalLm, sequence: &[u32]) -> Vec<f32> {
        let input = Tensor::new(sequence, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, None, None).unwrap(); // (1, t, vocab)
        logits
            .get(0)
            .unwrap()
            .get(sequence.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_rows_match(model: &CausalLm, logits: &[f32], sequences: &[Vec<u32>]) {
        let vocab = model.config.vocab_size;
        for (row, sequence) in sequences.iter().enumerate() {
            let expected = reference_logits(model, sequence);
            let got = &logits[row * vocab..][..vocab];
            let diff = expected
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "row {row} ({sequence:?}): max diff {diff}");
        }
    }

    #[test]
    fn ragged_cached_decoding_equals_the_training_forward_of_each_row() {
        let model = qwen2_with_lora();
        let decoder = InferenceModel::new(&model).unwrap();
        let mut sequences = vec![vec![1u32, 5, 9], vec![1, 40, 41, 42, 43, 44, 45], vec![2]];
        let counts: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let mut cache = decoder.new_cache(&[5, 9, 3]);
        let logits = decoder
            .forward(&sequences.concat(), &counts, &mut cache)
            .unwrap();
        assert_rows_match(&model, &logits, &sequences);
        // One decode step for every row.
        let next = [7u32, 8, 9];
        sequences.iter_mut().zip(next).for_each(|(s, t)| s.push(t));
        let logits = decoder.forward(&next, &[1, 1, 1], &mut cache).unwrap();
        assert_rows_match(&model, &logits, &sequences);
        // Drop the middle row and reorder the others: the cache follows.
        cache.keep_rows(&[2, 0]);
        let sequences = vec![
            [sequences[2].clone(), vec![11]].concat(),
            [sequences[0].clone(), vec![12]].concat(),
        ];
        let logits = decoder.forward(&[11, 12], &[1, 1], &mut cache).unwrap();
        assert_rows_match(&model, &logits, &sequences);
    }

    #[test]
    fn cached_forward_rejects_ids_that_do_not_match_the_counts() {
        let model = qwen2_with_lora();
        let decoder = InferenceModel::new(&model).unwrap();
        let mut cache = decoder.new_cache(&[4, 4]);
        let error = decoder.forward(&[1, 2, 3], &[1, 1], &mut cache);
        assert!(matches!(error, Err(ModelError::Invalid(_))));
        let error = decoder.forward(&[1, 2], &[2, 0], &mut cache);
        assert!(matches!(error, Err(ModelError::Invalid(_))));
    }
}
