//! `chathub convert`: quantize once, save as GGUF, load in seconds afterwards.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::ModelArgs;

/// Flags of `chathub convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Where to write the GGUF file.
    #[arg(long)]
    out: PathBuf,
}

/// Loads, converts and writes the model.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let engine = args.model.load()?;
    let loaded = started.elapsed();
    engine.save_gguf(&args.out)?;
    let bytes = std::fs::metadata(&args.out)?.len();
    eprintln!(
        "chathub: wrote {} ({:.2} GB, {}) in {:.1} s (loading and converting {:.1} s)",
        args.out.display(),
        bytes as f64 / 1e9,
        engine
            .quantization()
            .map_or_else(|| "dense".to_string(), |q| q.to_string()),
        started.elapsed().as_secs_f64(),
        loaded.as_secs_f64()
    );
    Ok(())
}
