//! `chathub bench`: prefill and decode speed, time to first token, memory, and the roofline.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use chathub::{ChatRequest, Engine, Message};
use clap::Args;
use rayon::prelude::*;
use serde::Serialize;

use super::ModelArgs;

/// Flags of `chathub bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Prompt length in tokens, i.e. the context decoding starts from (approximate: whole words
    /// are added until it is reached).
    #[arg(long, visible_alias = "context", default_value_t = 32)]
    prompt_tokens: usize,

    /// Also time the first token of the last turn of a chat this many turns long (16-token
    /// questions, 32-token replies, each reply read before the next question so its pre-fill
    /// for the next turn has run), with the earlier turns' caches reused and without (0 skips
    /// it).
    #[arg(long, default_value_t = 5)]
    turns: usize,

    /// Tokens to generate (stop tokens are ignored so every run is the same length).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,

    /// Measured runs; each figure reported is the median over them (as the peers' scripts in
    /// `benches/peers` report theirs), and every run is listed.
    #[arg(long, default_value_t = 3)]
    runs: usize,

    /// Where the synthetic model is written (once) when no --model is given.
    #[arg(long, env = "CHATHUB_BENCH_DIR")]
    work_dir: Option<PathBuf>,

    /// The synthetic model's architecture when no --model is given: `785m` (the mid-size
    /// config the side-by-side tables use) or `6b` (ChatGLM3-6B's shape: 12.5 GB of f16 weights
    /// written to disk once, for memory and speed at full size).
    #[arg(long, value_enum, default_value_t = SyntheticSize::Mid785m)]
    synthetic: SyntheticSize,

    /// Also run this many generations at once (the same request from as many threads,
    /// released together) and report aggregate and per-stream decode speed, inter-token
    /// latency and time to first token under load: what continuous batching buys (1 skips it).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,

    /// With --concurrency: a prompt of this many tokens arrives while the streams decode, and
    /// the report says how long their tokens waited meanwhile (0 skips it).
    #[arg(long, default_value_t = 0)]
    late_prompt_tokens: usize,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Architectures of the synthetic benchmark model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SyntheticSize {
    /// 785M parameters: hidden 2048, 12 layers, ffn 5504.
    #[value(name = "785m")]
    Mid785m,
    /// ChatGLM3-6B's shape: 6.2B parameters, hidden 4096, 28 layers, ffn 13696.
    #[value(name = "6b")]
    Chatglm3_6b,
    /// GLM-4-9B's shape (glm-4-9b-chat layout): 9.4B parameters, hidden 4096, 40 layers,
    /// vocabulary 151552.
    #[value(name = "glm4-9b")]
    Glm4_9b,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    device: String,
    dtype: String,
    quant: Option<String>,
    /// What the conversations' key/value caches store (`--kv-cache-dtype`).
    kv_cache_dtype: String,
    threads: usize,
    parameters: usize,
    load_s: f64,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
    /// Gaps between consecutive streamed pieces of one stream alone, over all runs: the
    /// reference for the same figures under `--concurrency`.
    inter_token_ms_p50: f64,
    inter_token_ms_p99: f64,
    /// Each measured run's figures, in order.
    per_run: Vec<RunFigures>,
    peak_rss_bytes: u64,
    load_peak_rss_bytes: u64,
    /// Resident memory right after loading: the model's own footprint.
    loaded_rss_bytes: u64,
    weight_bytes_per_token: usize,
    decode_read_gb_per_s: f64,
    /// Read bandwidth of host memory; `None` on a GPU, whose own is not probed.
    machine_read_gb_per_s: Option<f64>,
    roofline_tokens_per_s: Option<f64>,
    roofline_ratio: Option<f64>,
    last_turn_ttft_ms_reused: Option<f64>,
    last_turn_ttft_ms_cold: Option<f64>,
    last_turn_prompt_tokens: Option<usize>,
    /// With --concurrency above 1.
    concurrent: Option<ConcurrentFigures>,
}

/// Several generations at once (`--concurrency`), medians over the runs.
#[derive(Debug, Clone, Serialize)]
struct ConcurrentFigures {
    streams: usize,
    /// Tokens of all streams per second while all of them were decoding (NaN, `null` in JSON,
    /// when they never were at once: prompts longer than the replies).
    aggregate_decode_tokens_per_s: f64,
    /// `aggregate_decode_tokens_per_s` over one stream's `decode_tokens_per_s`.
    speedup_over_one_stream: f64,
    /// Median over the streams of each one's own decode speed.
    per_stream_decode_tokens_per_s: f64,
    /// Gaps between a stream's consecutive tokens while every stream was decoding, over all
    /// streams and runs.
    inter_token_ms_p50: f64,
    inter_token_ms_p99: f64,
    /// `inter_token_ms_p99` over one stream's alone: what sharing the model costs the slowest
    /// tokens.
    p99_over_one_stream: f64,
    /// The longest gap anywhere, start-up included (the other streams' prompts run then).
    longest_gap_ms: f64,
    /// From the release of all streams to each one's first token: median and slowest.
    ttft_ms_median: f64,
    ttft_ms_max: f64,
    /// Sequences per forward pass, on average (1 when they never shared one).
    sequences_per_pass: f64,
    /// With --late-prompt-tokens: its prompt length and time to first token, and the longest
    /// gap between two tokens of the running streams while it was being prefilled.
    late_prompt_tokens: Option<usize>,
    late_prompt_ttft_ms: Option<f64>,
    late_prompt_longest_gap_ms: Option<f64>,
}

/// One measured run.
#[derive(Debug, Clone, Copy, Serialize)]
struct RunFigures {
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The value below which a fraction `p` of `values` lie (nearest rank); NaN when empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints the report.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let model_args = ModelArgs {
        model: match &args.model.model {
            Some(dir) => Some(dir.clone()),
            None if args.model.demo => Some(chathub::demo_model_dir()?),
            None => {
                let (dir, written) = synthetic_dir(args.work_dir.clone(), args.synthetic)?;
                if written {
                    // Writing held the random weights in memory; measure in a fresh process so
                    // peak RSS is the loader's alone.
                    let status = std::process::Command::new(std::env::current_exe()?)
                        .args(std::env::args_os().skip(1))
                        .status()?;
                    std::process::exit(status.code().unwrap_or(1));
                }
                Some(dir)
            }
        },
        demo: false,
        family: args.model.family,
        dtype: args.model.dtype,
        quant: args.model.quant,
        cuda: args.model.cuda,
        kv_cache_dtype: args.model.kv_cache_dtype,
    };
    let started = Instant::now();
    let engine = model_args.load()?;
    let load_s = started.elapsed().as_secs_f64();
    let load_peak_rss_bytes = peak_rss_bytes();
    let loaded_rss_bytes = rss_bytes();

    let request = ChatRequest {
        ignore_stop: true,
        skip_prefix_cache: true,
        ..ChatRequest::new(prompt_of_length(&engine, args.prompt_tokens)?)
            .max_new_tokens(args.gen_tokens)
            .greedy()
    };
    // Warm-up: touches every weight page and the allocator's pools.
    engine.chat(&ChatRequest {
        max_new_tokens: Some(2),
        ..request.clone()
    })?;
    let mut runs = Vec::new();
    let mut usage = None;
    let mut gaps = Vec::new();
    for run in 0..args.runs.max(1) {
        let mut last_piece: Option<Instant> = None;
        let outcome = engine.chat_stream(&request, |_| {
            let now = Instant::now();
            if let Some(last) = last_piece.replace(now) {
                gaps.push((now - last).as_secs_f64() * 1e3);
            }
            std::ops::ControlFlow::Continue(())
        })?;
        tracing::info!(
            run,
            decode_tokens_per_s = outcome.timings.decode_tokens_per_s,
            prefill_tokens_per_s = outcome.timings.prefill_tokens_per_s,
            "bench run"
        );
        runs.push(RunFigures {
            prefill_tokens_per_s: outcome.timings.prefill_tokens_per_s,
            decode_tokens_per_s: outcome.timings.decode_tokens_per_s,
            ttft_ms: outcome.timings.ttft_ms,
        });
        usage = Some(outcome.usage);
    }
    let usage = usage.context("no run")?;
    let figure = |f: fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    let decode_tokens_per_s = figure(|r| r.decode_tokens_per_s);
    let turns = (args.turns > 1)
        .then(|| last_turn_ttft(&engine, args.turns))
        .transpose()?;
    let concurrent = (args.concurrency > 1)
        .then(|| {
            concurrent_figures(
                &engine,
                &request,
                args.concurrency,
                args.runs.max(1),
                args.late_prompt_tokens,
                decode_tokens_per_s,
                percentile(&gaps, 0.99),
            )
        })
        .transpose()?;
    // Before the bandwidth probe, whose buffer would count in the peak.
    let peak_rss = peak_rss_bytes();
    let bytes = engine.weight_bytes_per_token();
    // The probe reads host memory: it bounds CPU decoding, not a GPU's.
    let bandwidth = (!args.model.cuda).then(read_bandwidth_gb_per_s);
    let roofline = bandwidth.map(|b| b * 1e9 / bytes as f64);
    let report = BenchReport {
        model: engine.dir().display().to_string(),
        device: if args.model.cuda { "cuda" } else { "cpu" }.into(),
        dtype: format!("{:?}", args.model.dtype).to_lowercase(),
        quant: engine.quantization().map(|q| q.to_string()),
        kv_cache_dtype: format!("{:?}", engine.kv_cache_dtype()).to_lowercase(),
        threads: rayon::current_num_threads(),
        parameters: engine.arch().parameter_count(),
        load_s,
        prompt_tokens: usage.prompt_tokens,
        gen_tokens: usage.completion_tokens,
        prefill_tokens_per_s: figure(|r| r.prefill_tokens_per_s),
        decode_tokens_per_s,
        ttft_ms: figure(|r| r.ttft_ms),
        inter_token_ms_p50: percentile(&gaps, 0.5),
        inter_token_ms_p99: percentile(&gaps, 0.99),
        per_run: runs.clone(),
        peak_rss_bytes: peak_rss,
        load_peak_rss_bytes,
        loaded_rss_bytes,
        weight_bytes_per_token: bytes,
        decode_read_gb_per_s: decode_tokens_per_s * bytes as f64 / 1e9,
        machine_read_gb_per_s: bandwidth,
        roofline_tokens_per_s: roofline,
        roofline_ratio: roofline.map(|r| decode_tokens_per_s / r),
        last_turn_ttft_ms_reused: turns.map(|t| t.reused_ms),
        last_turn_ttft_ms_cold: turns.map(|t| t.cold_ms),
        last_turn_prompt_tokens: turns.map(|t| t.prompt_tokens),
        concurrent,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report;
        println!(
            "model            {} ({} parameters, {} threads, {} key/value cache)",
            r.model, r.parameters, r.threads, r.kv_cache_dtype
        );
        println!(
            "load             {:.2} s, peak RSS {:.2} GB, {:.2} GB once loaded",
            r.load_s,
            r.load_peak_rss_bytes as f64 / 1e9,
            r.loaded_rss_bytes as f64 / 1e9
        );
        println!(
            "prefill          {:.1} tokens/s ({} tokens)",
            r.prefill_tokens_per_s, r.prompt_tokens
        );
        println!("time to 1st tok  {:.1} ms", r.ttft_ms);
        println!(
            "between tokens   p50 {:.1} ms, p99 {:.1} ms",
            r.inter_token_ms_p50, r.inter_token_ms_p99
        );
        println!(
            "decode           {:.2} tokens/s ({} tokens)",
            r.decode_tokens_per_s, r.gen_tokens
        );
        if let (Some(roofline), Some(read), Some(ratio)) = (
            r.roofline_tokens_per_s,
            r.machine_read_gb_per_s,
            r.roofline_ratio,
        ) {
            println!(
                "roofline         {roofline:.2} tokens/s at {read:.1} GB/s read, {:.2} GB/token: {:.0}% reached",
                r.weight_bytes_per_token as f64 / 1e9,
                100.0 * ratio
            );
        }
        println!("peak RSS         {:.2} GB", r.peak_rss_bytes as f64 / 1e9);
        if let (Some(reused), Some(cold), Some(n)) = (
            r.last_turn_ttft_ms_reused,
            r.last_turn_ttft_ms_cold,
            r.last_turn_prompt_tokens,
        ) {
            println!(
                "turn {} TTFT     {reused:.1} ms with earlier turns reused, {cold:.1} ms cold ({n} prompt tokens)",
                args.turns
            );
        }
        if let Some(c) = &r.concurrent {
            // Streams whose prompts take longer than the others' replies never decode together.
            let in_all = if c.aggregate_decode_tokens_per_s.is_nan() {
                "no window with every stream decoding (more --gen-tokens)".to_string()
            } else {
                format!(
                    "{:.2} tokens/s in all ({:.2}x one stream)",
                    c.aggregate_decode_tokens_per_s, c.speedup_over_one_stream
                )
            };
            println!(
                "{} streams       {in_all}, {:.2} per stream, {:.2} sequences per pass",
                c.streams, c.per_stream_decode_tokens_per_s, c.sequences_per_pass
            );
            println!(
                "  between tokens p50 {:.1} ms, p99 {:.1} ms ({:.2}x one stream's, all decoding), longest {:.1} ms; first token median {:.1} ms, max {:.1} ms",
                c.inter_token_ms_p50,
                c.inter_token_ms_p99,
                c.p99_over_one_stream,
                c.longest_gap_ms,
                c.ttft_ms_median,
                c.ttft_ms_max
            );
            if let (Some(n), Some(ttft), Some(gap)) = (
                c.late_prompt_tokens,
                c.late_prompt_ttft_ms,
                c.late_prompt_longest_gap_ms,
            ) {
                println!(
                    "  a {n}-token prompt arriving meanwhile: first token after {ttft:.1} ms, the streams' longest gap {gap:.1} ms"
                );
            }
        }
    }
    Ok(())
}

/// One stream's token times, from the release of all streams.
#[derive(Debug, Default)]
struct StreamTimes {
    tokens: Vec<f64>,
}

/// Runs `streams` copies of `request` at once, `runs` times, and measures them.
fn concurrent_figures(
    engine: &Engine,
    request: &ChatRequest,
    streams: usize,
    runs: usize,
    late_prompt_tokens: usize,
    one_stream_decode: f64,
    one_stream_p99: f64,
) -> anyhow::Result<ConcurrentFigures> {
    let late = if late_prompt_tokens > 0 {
        let prompt = prompt_of_length(engine, late_prompt_tokens)?;
        Some(ChatRequest {
            skip_prefix_cache: true,
            ..ChatRequest::new(prompt).max_new_tokens(1).greedy()
        })
    } else {
        None
    };
    let mut aggregate = Vec::new();
    let mut per_stream = Vec::new();
    let mut gaps = Vec::new();
    let mut longest_gap = 0f64;
    let mut ttfts = Vec::new();
    let mut late_figures = Vec::new();
    let counts_before = engine.batch_counts();
    for _ in 0..runs {
        let start = std::sync::Barrier::new(streams + 1);
        let released = std::sync::OnceLock::new();
        let decoding = std::sync::atomic::AtomicUsize::new(0);
        let (times, late_run) = std::thread::scope(|scope| -> anyhow::Result<_> {
            let threads: Vec<_> = (0..streams)
                .map(|_| {
                    let (start, released, decoding) = (&start, &released, &decoding);
                    scope.spawn(move || -> chathub::Result<StreamTimes> {
                        start.wait();
                        let zero: &Instant = released.get_or_init(Instant::now);
                        let mut times = StreamTimes::default();
                        engine.chat_stream(request, |_| {
                            times.tokens.push(zero.elapsed().as_secs_f64() * 1e3);
                            if times.tokens.len() == 4 {
                                decoding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            std::ops::ControlFlow::Continue(())
                        })?;
                        Ok(times)
                    })
                })
                .collect();
            start.wait();
            let late_run = late
                .as_ref()
                .map(|late| -> chathub::Result<(f64, f64)> {
                    // Once every stream is decoding.
                    while decoding.load(std::sync::atomic::Ordering::SeqCst) < streams {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    let zero = *released.get_or_init(Instant::now);
                    let arrived = zero.elapsed().as_secs_f64() * 1e3;
                    let outcome = engine.chat(late)?;
                    Ok((arrived, outcome.timings.ttft_ms))
                })
                .transpose()?;
            let times = threads
                .into_iter()
                .map(|t| t.join().expect("bench thread"))
                .collect::<chathub::Result<Vec<_>>>()?;
            Ok((times, late_run))
        })?;
        // The window in which every stream was decoding.
        let from = times
            .iter()
            .filter_map(|t| t.tokens.first())
            .fold(0f64, |a, &b| a.max(b));
        let to = times
            .iter()
            .filter_map(|t| t.tokens.last())
            .fold(f64::INFINITY, |a, &b| a.min(b));
        let in_window: usize = times
            .iter()
            .map(|t| t.tokens.iter().filter(|&&x| x > from && x <= to).count())
            .sum();
        if to > from {
            aggregate.push(in_window as f64 / ((to - from) / 1e3));
        }
        for t in &times {
            if let (Some(first), Some(last)) = (t.tokens.first(), t.tokens.last()) {
                ttfts.push(*first);
                if t.tokens.len() > 1 {
                    per_stream.push((t.tokens.len() - 1) as f64 / ((last - first) / 1e3));
                }
            }
            // Steady state: both tokens while every stream was decoding.
            gaps.extend(
                t.tokens
                    .windows(2)
                    .filter(|w| w[0] >= from && w[1] <= to)
                    .map(|w| w[1] - w[0]),
            );
            longest_gap = t
                .tokens
                .windows(2)
                .map(|w| w[1] - w[0])
                .fold(longest_gap, f64::max);
        }
        if let Some((arrived, ttft)) = late_run {
            let until = arrived + ttft;
            let longest = times
                .iter()
                .flat_map(|t| t.tokens.windows(2))
                .filter(|w| w[1] > arrived && w[0] < until)
                .map(|w| w[1] - w[0])
                .fold(0f64, f64::max);
            late_figures.push((ttft, longest));
        }
    }
    let counts_after = engine.batch_counts();
    let aggregate_decode = median(aggregate);
    Ok(ConcurrentFigures {
        streams,
        aggregate_decode_tokens_per_s: aggregate_decode,
        speedup_over_one_stream: aggregate_decode / one_stream_decode,
        per_stream_decode_tokens_per_s: median(per_stream),
        inter_token_ms_p50: percentile(&gaps, 0.5),
        inter_token_ms_p99: percentile(&gaps, 0.99),
        p99_over_one_stream: percentile(&gaps, 0.99) / one_stream_p99,
        longest_gap_ms: longest_gap,
        ttft_ms_median: median(ttfts.clone()),
        ttft_ms_max: percentile(&ttfts, 1.0),
        sequences_per_pass: (counts_after.sequences - counts_before.sequences) as f64
            / (counts_after.passes - counts_before.passes).max(1) as f64,
        late_prompt_tokens: late.as_ref().map(|_| late_prompt_tokens),
        late_prompt_ttft_ms: (!late_figures.is_empty())
            .then(|| median(late_figures.iter().map(|f| f.0).collect())),
        late_prompt_longest_gap_ms: (!late_figures.is_empty())
            .then(|| median(late_figures.iter().map(|f| f.1).collect())),
    })
}

#[derive(Debug, Clone, Copy)]
struct LastTurn {
    reused_ms: f64,
    cold_ms: f64,
    prompt_tokens: usize,
}

/// Plays a chat of `turns` turns (history resent each turn, as AIHub does) and times the first
/// token of the last one; then the same last request again with the prefix cache bypassed.
fn last_turn_ttft(engine: &Engine, turns: usize) -> anyhow::Result<LastTurn> {
    // A chat's shape: short questions, longer replies.
    let question = prompt_of_length(engine, 16)?;
    let mut history = vec![Message::system("You are a benchmark.")];
    let ask = |history: &[Message]| ChatRequest {
        ignore_stop: true,
        ..ChatRequest::new(question.clone())
            .history(history.to_vec())
            .max_new_tokens(32)
            .greedy()
    };
    let mut last = None;
    for _ in 0..turns {
        // The user reads the reply before asking again: the reply's pre-fill for the next
        // turn (ModelOptions::warm_next_turn) runs meanwhile.
        engine.wait_for_background_work();
        let outcome = engine.chat(&ask(&history))?;
        history.push(Message::user(question.clone()));
        history.push(Message::assistant(outcome.text.clone()));
        last = Some(outcome);
    }
    let last = last.context("no turn")?;
    history.truncate(history.len() - 2);
    engine.wait_for_background_work();
    let cold = engine.chat(&ChatRequest {
        skip_prefix_cache: true,
        ..ask(&history)
    })?;
    Ok(LastTurn {
        reused_ms: last.timings.ttft_ms,
        cold_ms: cold.timings.ttft_ms,
        prompt_tokens: last.usage.prompt_tokens,
    })
}

/// Writes the synthetic mid-size model once and returns its directory, and whether it was
/// written just now.
fn synthetic_dir(
    work_dir: Option<PathBuf>,
    size: SyntheticSize,
) -> anyhow::Result<(PathBuf, bool)> {
    let (name, config) = match size {
        SyntheticSize::Mid785m => ("chathub-bench-785m-v2", chathub::bench_config()),
        SyntheticSize::Chatglm3_6b => ("chathub-bench-6b-v1", chathub::chatglm3_6b_config()),
        SyntheticSize::Glm4_9b => ("chathub-bench-glm4-9b-v1", chathub::glm4_9b_config()),
    };
    let dir = work_dir.unwrap_or_else(|| std::env::temp_dir().join(name));
    if !dir.join("complete").is_file() {
        eprintln!(
            "chathub: writing a synthetic {}-parameter model to {} (once)",
            config.arch_spec().parameter_count(),
            dir.display()
        );
        let tokenizer = match size {
            SyntheticSize::Glm4_9b => chathub::glm4_tokenizer_model().to_vec(),
            _ => std::fs::read(chathub::demo_model_dir()?.join("tokenizer.model"))?,
        };
        chathub::write_model_dir(&dir, &config, &tokenizer, 7, 1 << 30)?;
        return Ok((dir, true));
    }
    Ok((dir, false))
}

/// A user message whose chat prompt has at least `tokens` tokens.
fn prompt_of_length(engine: &Engine, tokens: usize) -> anyhow::Result<String> {
    const WORDS: [&str; 8] = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs",
    ];
    let mut text = String::from("hello");
    let mut i = 0;
    while engine.prompt_ids(&text, &[])?.len() < tokens {
        text.push(' ');
        text.push_str(WORDS[i % WORDS.len()]);
        i += 1;
    }
    Ok(text)
}

/// The process's peak resident set (VmHWM), 0 where /proc is unavailable.
fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// Resident memory now: what the loaded model keeps, once loading's transients are gone.
fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// A `/proc/self/status` size field in bytes (0 where there is none).
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Read bandwidth of main memory with every rayon thread summing its own part of a 512 MiB
/// buffer: the denominator of the decode roofline. Best of five passes.
fn read_bandwidth_gb_per_s() -> f64 {
    // Pages as the weights get them (2 MiB where the kernel has them).
    let buffer: Vec<f32> = chathub::huge_pages::filled(128 << 20);
    let bytes = (buffer.len() * 4) as f64;
    let mut best = 0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let sum: f32 = buffer
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for block in c.chunks_exact(16) {
                    for i in 0..16 {
                        acc[i] += block[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
        best = best.max(bytes / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
        assert!(median(Vec::new()).is_nan());
    }
}
