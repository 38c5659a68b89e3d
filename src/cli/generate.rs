//! `chathub generate`: one request from a JSON file, the debugging view of a reply.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chathub::ChatRequest;
use clap::Args;
use serde::Serialize;

use super::{ModelArgs, SamplingArgs};

/// Flags of `chathub generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    sampling: SamplingArgs,

    /// A JSON file shaped like `{"prompt": "...", "history": [{"role": "user", "content":
    /// "..."}], "max_new_tokens": 20, "greedy": true}`, plus the proto's `max_length`, `top_p`,
    /// `temperature`, OpenAI-shaped `tools`, and history with assistant `tool_calls` and `tool`
    /// results; `-` reads stdin.
    #[arg(long)]
    request: PathBuf,

    /// Largest request file read, in bytes: a request is text, and reading `/dev/zero` by
    /// mistake should fail, not fill the memory.
    #[arg(long, env = "CHATHUB_MAX_REQUEST_BYTES", default_value_t = 64 << 20)]
    max_request_bytes: u64,

    /// Print the reply as the official code returns it (`response`), the raw decode, prompt and
    /// completion token ids, finish reason, usage and timings as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    family: &'a str,
    /// `text`, `tool_call` or `metadata`: the shape of `response`.
    response_kind: &'static str,
    #[serde(flatten)]
    outcome: &'a chathub::ChatOutcome,
}

/// Runs the request and prints the result.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let bytes = read_limited(&args.request, args.max_request_bytes)
        .with_context(|| format!("reading {}", args.request.display()))?;
    let request: ChatRequest = serde_json::from_slice(&bytes)
        .with_context(|| format!("invalid request JSON in {}", args.request.display()))?;
    let request = args.sampling.apply(request);
    let engine = args.model.load()?;
    let outcome = engine.chat(&request)?;
    if args.json {
        let report = Report {
            model: engine.dir().display().to_string(),
            family: engine.family().as_str(),
            response_kind: outcome.reply.kind().as_str(),
            outcome: &outcome,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match &outcome.reply {
            chathub::Reply::Text(text) => println!("{text}"),
            other => println!("{}", other.to_official_json()),
        }
    }
    Ok(())
}

/// The file (`-`: stdin), refused once it passes `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path)?)
    };
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        anyhow::bail!("larger than {limit} bytes (--max-request-bytes)");
    }
    Ok(bytes)
}
