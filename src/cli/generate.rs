//! `chathub generate`: one request from a JSON file, the debugging view of a reply.

use std::path::PathBuf;

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
    let bytes = if args.request.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(&args.request)
            .with_context(|| format!("reading {}", args.request.display()))?
    };
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
