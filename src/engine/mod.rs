//! A loaded chat model and the generation loop every adapter drives.

pub(crate) mod batcher;
pub(crate) mod next_turn;
pub(crate) mod prefix_cache;
pub(crate) mod sampling;
pub(crate) mod stop;
pub(crate) mod synthetic;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::Value;

use crate::chat::generation::GenerationDefaults;
use crate::chat::message::{Message, Role};
use crate::chat::reply::Reply;
use crate::chat::request::{
    ChatOutcome, ChatRequest, FinishReason, ResolvedParams, SpecialText, Timings, Usage,
};
use crate::chat::tools::ToolCall;
use crate::engine::batcher::{BatchCounts, Batcher, Decode, Ended, Event};
use crate::engine::next_turn::NextTurnWarmer;
use crate::engine::prefix_cache::PrefixCache;
use crate::engine::sampling::Sampler;
use crate::engine::stop::StopGate;
use crate::error::{Error, Result};
use crate::families::reply::parse_reply;
use crate::families::reply::stream::ReplyStream;
use crate::families::source::{self, ModelSource};
use crate::families::{ChatFormat, Conversation, ModelFamily, Prompt};
use crate::nn::names::TensorNames;
use crate::nn::quantization::Quantization;
use crate::nn::spec::ArchSpec;
use crate::nn::transformer::Transformer;
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file::Value as GgufValue;

/// Prompt tokens run through the model at once; bounds the attention scratch memory.
const PREFILL_CHUNK: usize = 256;

/// The compute dtype and the weight-matrix dtype. On the CPU, a 16-bit dtype narrows only the
/// weight matrices (half the bytes read per token); activations and norms stay f32, where
/// candle's CPU kernels are fast and exact, and so do caches unless
/// [`ModelOptions::kv_cache_dtype`] says otherwise. On a GPU the whole model runs in it.
fn dtypes(options: &ModelOptions) -> (DType, DType) {
    // Matrices that are quantized at load are read in 16 bits (what checkpoints store) and
    // widened a band at a time: a whole f32 copy of the largest matrix would be the peak.
    let quantizing_on_cpu = options.quantization.is_some() && options.device.is_cpu();
    let matrix_dtype = options.dtype.unwrap_or(if quantizing_on_cpu {
        DType::F16
    } else {
        DType::F32
    });
    let dtype = if options.device.is_cpu() {
        DType::F32
    } else {
        matrix_dtype
    };
    (dtype, matrix_dtype)
}

/// How to load a model.
///
/// # Examples
///
/// ```
/// use chathub::{ModelFamily, ModelOptions};
/// let options = ModelOptions::default().family(ModelFamily::ChatGlm2);
/// assert_eq!(options.family, Some(ModelFamily::ChatGlm2));
/// ```
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Chat format; detected from the files when `None`.
    pub family: Option<ModelFamily>,
    /// Where to compute.
    pub device: Device,
    /// What to store the weight matrices in; f32 when `None` (checkpoints are f16, upcast on
    /// load as the reference does on CPU). On the CPU, f16/bf16 halve the bytes read per token
    /// while activations stay f32; on a GPU the whole model runs in this dtype.
    pub dtype: Option<DType>,
    /// Quantize every linear layer's weights at load (`None`: keep them dense).
    pub quantization: Option<Quantization>,
    /// Bytes of key/value caches kept from finished requests, so a prompt that repeats an
    /// earlier conversation only runs its new tokens (0 turns reuse off). Default 512 MiB.
    pub prefix_cache_bytes: usize,
    /// After a reply, pre-fill it on a background thread as the next turn's prompt will encode
    /// it, so that turn only runs its new question (default on; needs the prefix cache).
    pub warm_next_turn: bool,
    /// What conversations' key/value caches store: f32 or f16; the compute dtype when `None`
    /// (f32 on the CPU). f16 halves each conversation's memory per token (so
    /// `--kv-cache-bytes` admits twice the tokens) and the bytes a decode step's attention
    /// reads, as llama.cpp's default cache does; the keys and values are rounded to f16, so
    /// replies can differ slightly from an f32 cache's (each is still the same alone or
    /// batched). Without AVX-512 the CPU widens the cache for every step's attention: keep
    /// f32 there.
    pub kv_cache_dtype: Option<DType>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            family: None,
            device: Device::Cpu,
            dtype: None,
            quantization: None,
            prefix_cache_bytes: 512 << 20,
            warm_next_turn: true,
            kv_cache_dtype: None,
        }
    }
}

impl ModelOptions {
    /// Forces the chat format instead of detecting it.
    ///
    /// ```
    /// let o = chathub::ModelOptions::default().family(chathub::ModelFamily::ChatGlm3);
    /// assert!(o.family.is_some());
    /// ```
    #[must_use]
    pub fn family(mut self, family: ModelFamily) -> Self {
        self.family = Some(family);
        self
    }

    /// Computes on `device` (a CUDA device needs the `cuda` feature).
    ///
    /// ```
    /// let o = chathub::ModelOptions::default().device(chathub::candle_core::Device::Cpu);
    /// assert!(o.device.is_cpu());
    /// ```
    #[must_use]
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Quantizes the weights at load.
    ///
    /// ```
    /// let o = chathub::ModelOptions::default().quantization(chathub::Quantization::Q8_0);
    /// assert_eq!(o.quantization, Some(chathub::Quantization::Q8_0));
    /// ```
    #[must_use]
    pub fn quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = Some(quantization);
        self
    }

    /// Computes in `dtype` (f32, f16 or bf16).
    ///
    /// ```
    /// let o = chathub::ModelOptions::default().dtype(chathub::candle_core::DType::F16);
    /// assert_eq!(o.dtype, Some(chathub::candle_core::DType::F16));
    /// ```
    #[must_use]
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Stores conversations' keys and values in `dtype` (f32 or f16; see
    /// [`ModelOptions::kv_cache_dtype`]).
    ///
    /// ```
    /// let o = chathub::ModelOptions::default().kv_cache_dtype(chathub::candle_core::DType::F16);
    /// assert_eq!(o.kv_cache_dtype, Some(chathub::candle_core::DType::F16));
    /// ```
    #[must_use]
    pub fn kv_cache_dtype(mut self, dtype: DType) -> Self {
        self.kv_cache_dtype = Some(dtype);
        self
    }
}

/// A chat model loaded from a Hugging Face directory, ready to serve requests.
///
/// `Engine` is `Send + Sync`: share one behind an `Arc` and call it from many threads at once.
/// Each call owns its key/value cache, freed when the call returns; the weights are shared.
/// Calls running at once share the model's forward passes (continuous batching: one pass reads
/// the weights for every conversation's next step), and each gets exactly the reply it would
/// get alone; [`Engine::batch_counts`] shows how much was shared.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> chathub::Result<()> {
/// use chathub::{ChatRequest, Engine, Message};
///
/// let engine = Engine::load("THUDM/chatglm3-6b")?;
/// let request = ChatRequest::new("What is the capital of France?")
///     .history(vec![Message::system("Answer in one word.")]);
/// let outcome = engine.chat_stream(&request, |delta| {
///     print!("{delta}");
///     std::ops::ControlFlow::Continue(())
/// })?;
/// println!("\n{:?}, {:.1} tokens/s", outcome.finish_reason, outcome.timings.decode_tokens_per_s);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Engine {
    model: Arc<Transformer>,
    /// Every generation's forward passes, batched across concurrent requests.
    batcher: Arc<Batcher>,
    tokenizer: Tokenizer,
    format: Box<dyn ChatFormat>,
    names: &'static TensorNames,
    /// The small files the model was read from (config, tokenizer), for [`Engine::save_gguf`].
    files: Vec<(String, Vec<u8>)>,
    family: ModelFamily,
    defaults: GenerationDefaults,
    stop_ids: Vec<u32>,
    dir: PathBuf,
    quantization: Option<Quantization>,
    prefix_cache: Arc<PrefixCache>,
    next_turn: Option<NextTurnWarmer>,
}

impl Engine {
    /// Loads a model directory as THUDM publishes it, with default options.
    ///
    /// # Errors
    ///
    /// See [`Engine::load_with`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(dir, &ModelOptions::default())
    }

    /// Loads a model directory as its publisher lays it out (`config.json`, the weights as
    /// sharded or single safetensors or PyTorch `.bin`, the tokenizer files, and
    /// `generation_config.json` when present), a `.gguf` file written by
    /// [`Engine::save_gguf`] (`chathub convert`), or a llama.cpp GGUF file of a supported
    /// architecture.
    ///
    /// Blocks while reading the weights (seconds for a 6B model from a warm page cache).
    ///
    /// # Errors
    ///
    /// [`Error::Io`]/[`Error::MissingFile`] for a missing directory or file,
    /// [`Error::Json`]/[`Error::InvalidConfig`] for a bad config, [`Error::Weights`] for a
    /// truncated or corrupt weight file, [`Error::MissingTensor`]/[`Error::ShapeMismatch`] when
    /// the weights do not match the config, [`Error::Tokenizer`] for a bad tokenizer.
    pub fn load_with(dir: impl AsRef<Path>, options: &ModelOptions) -> Result<Self> {
        let path = dir.as_ref();
        let started = Instant::now();
        if let Some(cache_dtype) = options.kv_cache_dtype {
            Transformer::check_cache_dtype(cache_dtype)?;
        }
        let source = ModelSource::open(path)?;
        let opened = crate::families::open(&source, options.family)?;
        let stored_quantization = source.quantization;
        let (dtype, matrix_dtype) = dtypes(options);
        let weights = source.into_weights(dtype, matrix_dtype, &options.device)?;
        // A file that is already quantized keeps its format: quantizing again would stack errors.
        let quantization = stored_quantization
            .or_else(|| {
                let probe = opened
                    .names
                    .layer(0, opened.names.attention_output, "weight");
                weights.block_type(&probe).and_then(Quantization::from_ggml)
            })
            .or(options.quantization);
        tracing::info!(
            path = %path.display(),
            family = %opened.family,
            layers = opened.spec.num_layers,
            parameters = opened.spec.parameter_count(),
            file_bytes = weights.file_bytes(),
            "loading model"
        );
        let mut model = Transformer::load(
            &opened.spec,
            opened.names,
            &weights,
            dtype,
            &options.device,
            quantization,
        )?;
        drop(weights);
        if let Some(cache_dtype) = options.kv_cache_dtype {
            model.set_cache_dtype(cache_dtype)?;
        }
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
        let model = Arc::new(model);
        let prefix_cache = Arc::new(PrefixCache::new(options.prefix_cache_bytes));
        let batcher = Arc::new(Batcher::new(model.clone(), PREFILL_CHUNK));
        let next_turn = (options.warm_next_turn && options.prefix_cache_bytes > 0)
            .then(|| NextTurnWarmer::start(batcher.clone(), prefix_cache.clone()));
        Ok(Engine {
            model,
            batcher,
            tokenizer: opened.tokenizer,
            format: opened.format,
            names: opened.names,
            files: opened.files,
            family: opened.family,
            defaults: opened.defaults,
            stop_ids: opened.stop_ids,
            dir: path.to_path_buf(),
            quantization,
            prefix_cache,
            next_turn,
        })
    }

    /// Writes the loaded model (weights as they are in memory, quantized or not, plus config,
    /// sampling defaults, family and tokenizer) to one GGUF file that [`Engine::load`] reads
    /// back in seconds, with no quantizing.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be written.
    pub fn save_gguf(&self, path: impl AsRef<Path>) -> Result<()> {
        let name = String::from_utf8_lossy(
            self.files
                .iter()
                .find(|(n, _)| n == "config.json")
                .map_or(&[][..], |(_, b)| b),
        )
        .into_owned();
        let name = serde_json::from_str::<serde_json::Value>(&name)
            .ok()
            .and_then(|v| v.get("_name_or_path")?.as_str().map(str::to_string))
            .unwrap_or_else(|| self.family.as_str().to_string());
        let mut metadata = vec![
            (
                "general.architecture",
                GgufValue::String(format!("chathub-{}", self.family)),
            ),
            ("general.name", GgufValue::String(name)),
            (
                source::FAMILY_KEY,
                GgufValue::String(self.family.as_str().into()),
            ),
            (source::LAYOUT_KEY, GgufValue::String(self.names.id.into())),
            (
                source::QUANTIZATION_KEY,
                GgufValue::String(self.quantization.map_or("none", |q| q.as_str()).into()),
            ),
        ];
        let files = source::file_entries(&self.files);
        metadata.extend(files.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let tensors = self.model.export(self.names)?;
        crate::formats::gguf::write(path.as_ref(), &metadata, &tensors)
    }

    /// The chat format in use.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The transformer's sizes and switches, as read from the model's config.
    pub fn arch(&self) -> &ArchSpec {
        self.model.spec()
    }

    /// Sampling defaults used for fields a request leaves unset.
    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    /// Token ids that end a reply.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The weight format chosen at load, if the weights were quantized.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantization
    }

    /// What conversations' key/value caches store ([`ModelOptions::kv_cache_dtype`], or the
    /// compute dtype), and so the bytes each token of a conversation takes.
    pub fn kv_cache_dtype(&self) -> DType {
        self.model.cache_dtype()
    }

    /// Bytes of key/value cache each token of a conversation takes on this model, in its
    /// [`Engine::kv_cache_dtype`]: what `serve --kv-cache-bytes` is counted in.
    pub fn kv_cache_bytes_per_token(&self) -> usize {
        self.model.kv_bytes_per_token()
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of weights one decode step reads: the numerator of the memory-bandwidth roofline.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.model.weight_bytes_per_token()
    }

    /// The prompt ids a request produces (exactly the official builder's, history included).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty prompt.
    pub fn prompt_ids(&self, prompt: &str, history: &[crate::Message]) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::invalid("prompt", "\"\"", "must not be empty"));
        }
        let conversation = Conversation {
            history,
            prompt,
            prompt_role: Role::User,
            tools: &[],
            special_text: SpecialText::default(),
        };
        self.format.build(&self.tokenizer, &conversation)
    }

    /// The logits (`vocab_size` scores) for the token after `ids`, from a fresh cache.
    ///
    /// For evaluation and debugging: compare formats, check a checkpoint against reference
    /// logits, or score a continuation token by token.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no ids or an id outside the vocabulary,
    /// [`Error::PromptTooLong`] beyond the model's context.
    pub fn next_token_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.arch().vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(
                "ids",
                bad,
                "token id outside the vocabulary",
            ));
        }
        if ids.is_empty() {
            return Err(Error::invalid("ids", "[]", "at least one token is needed"));
        }
        let mut cache = self.model.new_cache(ids.len());
        let mut logits = Vec::new();
        for chunk in ids.chunks(PREFILL_CHUNK) {
            logits = self.model.forward(chunk, &mut cache)?;
        }
        Ok(logits)
    }

    /// Forward passes run so far and the sequences they carried: concurrent generations
    /// (threads calling [`Engine::chat_stream`] on one engine, or a server's requests) share
    /// each pass, so `sequences / passes` above 1 means they were batched.
    pub fn batch_counts(&self) -> BatchCounts {
        self.batcher.counts()
    }

    /// Blocks until background work on finished replies is done (see
    /// [`ModelOptions::warm_next_turn`]): for benchmarks that time the next turn as if the user
    /// had read the reply first, and for tests.
    pub fn wait_for_background_work(&self) {
        if let Some(next_turn) = &self.next_turn {
            next_turn.wait_idle();
        }
    }

    /// The ids any next prompt of this conversation starts with: history, this turn's question
    /// and `reply` as the prompt builder encodes them, up to where the next question's text
    /// begins (found by building with two different questions).
    fn next_prompt_start(&self, request: &ChatRequest, reply: &Reply) -> Vec<u32> {
        let mut history = request.history.clone();
        history.push(Message {
            role: request.prompt_role,
            ..Message::user(request.prompt.clone())
        });
        history.push(match reply {
            Reply::ToolCall { name, arguments } => Message::assistant_tool_calls(
                "",
                vec![ToolCall::new(name, Value::Object(arguments.clone()))],
            ),
            other => Message::assistant(other.as_text().unwrap_or_default()),
        });
        let build = |prompt| {
            self.format
                .build(
                    &self.tokenizer,
                    &Conversation {
                        history: &history,
                        prompt,
                        prompt_role: Role::User,
                        tools: &request.tools,
                        special_text: request.special_text,
                    },
                )
                .unwrap_or_default()
        };
        let (a, b) = (build("a"), build("b"));
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        a[..common].to_vec()
    }

    /// Checks a request the way [`Engine::chat_stream`] does before generating (parameters,
    /// roles, prompt length), without generating: lets a server reject bad requests before it
    /// starts streaming.
    ///
    /// # Errors
    ///
    /// As [`Engine::chat_stream`]'s argument errors.
    pub fn validate(&self, request: &ChatRequest) -> Result<()> {
        self.prepare(request).map(|_| ())
    }

    /// Bytes of key/value cache a generation of `request` holds at most: its prompt and every
    /// reply token it may produce (the cache is allocated for them when it starts). Checks the
    /// request as [`Engine::validate`] does, so it tokenizes the prompt: lets a server admit
    /// requests by memory (`serve --kv-cache-bytes`).
    ///
    /// # Errors
    ///
    /// As [`Engine::validate`].
    pub fn kv_cache_bytes_for(&self, request: &ChatRequest) -> Result<usize> {
        let (params, prompt, limit) = self.prepare(request)?;
        let room = limit - prompt.ids.len();
        let max_new = params.max_new_tokens.map_or(room, |n| n.min(room));
        Ok((prompt.ids.len() + max_new).saturating_mul(self.kv_cache_bytes_per_token()))
    }

    fn prepare(&self, request: &ChatRequest) -> Result<(ResolvedParams, Prompt, usize)> {
        let params = request.resolve(&self.defaults)?;
        let limit = params.max_length.min(self.arch().max_positions);
        let prompt = crate::families::build_within(
            self.format.as_ref(),
            &self.tokenizer,
            &Conversation {
                history: &request.history,
                prompt: &request.prompt,
                prompt_role: request.prompt_role,
                tools: &request.tools,
                special_text: request.special_text,
            },
            limit,
        )?;
        Ok((params, prompt, limit))
    }

    /// Generates a whole reply.
    ///
    /// # Errors
    ///
    /// See [`Engine::chat_stream`].
    pub fn chat(&self, request: &ChatRequest) -> Result<ChatOutcome> {
        self.chat_stream(request, |_| ControlFlow::Continue(()))
    }

    /// Generates a reply, calling `on_delta` with each new piece of text as soon as it is whole
    /// UTF-8. Returning `ControlFlow::Break(())` stops generation before the next token; the
    /// outcome then says [`FinishReason::Cancelled`].
    ///
    /// Runs on the calling thread and blocks until the reply ends; `on_delta` runs on that
    /// thread too. A token step in progress is not interrupted: cancellation takes effect
    /// within one token.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for out-of-range parameters or an empty prompt,
    /// [`Error::PromptTooLong`] when even the prompt without history leaves no room to reply,
    /// [`Error::Compute`] when the backend fails.
    pub fn chat_stream<F>(&self, request: &ChatRequest, mut on_delta: F) -> Result<ChatOutcome>
    where
        F: FnMut(&str) -> ControlFlow<()>,
    {
        let started = Instant::now();
        let (params, prompt, limit) = self.prepare(request)?;
        if prompt.dropped_messages > 0 {
            tracing::info!(
                dropped = prompt.dropped_messages,
                limit,
                "history trimmed to fit the context"
            );
        }
        let prompt_len = prompt.ids.len();
        let room = limit - prompt_len;
        let max_new = params.max_new_tokens.map_or(room, |n| n.min(room));
        let reused = if request.skip_prefix_cache {
            None
        } else {
            if let Some(next_turn) = &self.next_turn {
                next_turn.wait_for(&prompt.ids);
            }
            self.prefix_cache.take(&prompt.ids, prompt_len + max_new)
        };
        let (cache, cached) =
            reused.unwrap_or_else(|| (self.model.new_cache(prompt_len + max_new), 0));

        // From here on each step is batched with the other generations under way; the
        // batcher samples each token (so that the next step need not wait for this thread)
        // and this thread turns them into text.
        let stop_ids = if request.ignore_stop {
            Vec::new()
        } else {
            self.stop_ids
                .iter()
                .chain(&request.stop_token_ids)
                .copied()
                .collect()
        };
        let sampler = Sampler::new(params.sampling, params.repetition_penalty, params.seed);
        let decode = Decode::new(sampler, prompt.ids.clone(), stop_ids, max_new);
        let prefill_started = Instant::now();
        let mut generation = self
            .batcher
            .generate(&prompt.ids[cached..], cache, decode)?;

        let mut prefill = None;
        let mut completion = Vec::new();
        let mut decoder = self.tokenizer.decoder();
        let mut gate = StopGate::new(&request.stop);
        // What a user may see of the reply so far: the official reply's text, never the
        // metadata line or a tool call.
        let mut reply_gate = ReplyStream::new(self.format.reply_style(), !request.tools.is_empty());
        let mut delta = String::new();
        let mut ttft = None;
        let mut decode_started = Instant::now();
        let Ended {
            reason: mut finish_reason,
            cache,
            context,
        } = loop {
            let token = match generation.next() {
                Event::Token(token) => token,
                Event::End(ended) => break ended,
                Event::Failed(error) => return Err(error),
            };
            if prefill.is_none() {
                prefill = Some(prefill_started.elapsed());
                decode_started = Instant::now();
            }
            ttft.get_or_insert_with(|| started.elapsed());
            completion.push(token);
            delta.clear();
            decoder.push(token, &mut delta);
            let (shown, hit) = gate.push(&delta);
            let visible = reply_gate.push(&gate.text()[shown]);
            // Called every token, with "" when nothing became visible, so that a caller can
            // cancel within one token whatever the model is writing.
            // The reader's reason, whether or not the generation had ended by itself already.
            let stopped = if on_delta(&visible).is_break() {
                Some(FinishReason::Cancelled)
            } else {
                hit.then_some(FinishReason::Stop)
            };
            if let Some(reason) = stopped {
                break Ended {
                    reason,
                    ..generation.stop()?
                };
            }
        };
        let prefill = prefill.unwrap_or_else(|| prefill_started.elapsed());
        let (reply, tool_call_error, text) = if finish_reason == FinishReason::Cancelled {
            // The caller who cancelled gets no more callbacks.
            let parsed = parse_reply(
                self.format.reply_style(),
                gate.text(),
                !request.tools.is_empty(),
            );
            let text = reply_gate.display_text().to_string();
            (parsed.reply, parsed.tool_call_error, text)
        } else {
            // Bytes of an unfinished character, then whatever a stop string held back.
            delta.clear();
            decoder.finish(&mut delta);
            let (shown, hit) = gate.push(&delta);
            let rest = if hit {
                finish_reason = FinishReason::Stop;
                shown
            } else {
                shown.start..gate.finish().end
            };
            let mut visible = reply_gate.push(&gate.text()[rest]);
            let end = reply_gate.finish();
            visible.push_str(&end.delta);
            if !visible.is_empty() {
                let _ = on_delta(&visible);
            }
            (end.reply.reply, end.reply.tool_call_error, end.display_text)
        };
        if matches!(reply, Reply::ToolCall { .. }) && finish_reason != FinishReason::Cancelled {
            finish_reason = FinishReason::ToolCalls;
        }
        let raw_text = gate.into_text();
        let decode = decode_started.elapsed();
        let filed_under = context[..cache.len()].to_vec();
        self.prefix_cache.put(filed_under.clone(), cache);
        if finish_reason != FinishReason::Cancelled && !request.skip_prefix_cache {
            if let Some(next_turn) = &self.next_turn {
                next_turn.submit(self.next_prompt_start(request, &reply), filed_under);
            }
        }
        let decode_steps = completion.len().saturating_sub(1);
        let per_s = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let timings = Timings {
            ttft_ms: ttft.unwrap_or_default().as_secs_f64() * 1e3,
            prefill_ms: prefill.as_secs_f64() * 1e3,
            prefill_tokens_per_s: per_s(prompt_len - cached, prefill.as_secs_f64()),
            decode_ms: decode.as_secs_f64() * 1e3,
            decode_tokens_per_s: per_s(decode_steps, decode.as_secs_f64()),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        tracing::debug!(
            prompt_tokens = prompt_len,
            completion_tokens = completion.len(),
            ?finish_reason,
            ttft_ms = timings.ttft_ms,
            decode_tokens_per_s = timings.decode_tokens_per_s,
            "chat finished"
        );
        Ok(ChatOutcome {
            reply,
            text,
            raw_text,
            tool_call_error: tool_call_error.map(|e| e.to_string()),
            finish_reason,
            usage: Usage {
                prompt_tokens: prompt_len,
                cached_prompt_tokens: cached,
                completion_tokens: completion.len(),
            },
            prompt_token_ids: prompt.ids,
            completion_token_ids: completion,
            dropped_history_messages: prompt.dropped_messages,
            timings,
        })
    }
}
