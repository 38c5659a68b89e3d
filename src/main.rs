//! The `chathub` command line: chat, run one request, benchmark.

mod cli;

use clap::{Parser, Subcommand};

/// Run ChatGLM-family chat models (ChatGLM2-6B, ChatGLM3-6B, GLM-4) locally.
#[derive(Debug, Parser)]
#[command(name = "chathub", version, about)]
struct Cli {
    /// Log filter for stderr (tracing's EnvFilter syntax), e.g. `debug` or `chathub=trace`.
    #[arg(
        long,
        global = true,
        env = "CHATHUB_LOG",
        default_value = "chathub=info"
    )]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Chat in the terminal: type a message, get a streamed reply; history is kept.
    ///
    /// Reads piped stdin too, one user message per line. `/reset` clears the history,
    /// `/exit` quits. Without `--model`, chats with the built-in demo model (meaningless text).
    Chat(cli::chat::ChatArgs),
    /// Run one request from a JSON file and print the reply (or everything, with `--json`).
    #[command(arg_required_else_help = true)]
    Generate(cli::generate::GenerateArgs),
    /// Measure prefill and decode speed, time to first token and peak memory.
    ///
    /// Without `--model`, writes (once) and loads a synthetic 785M-parameter ChatGLM3 with random
    /// weights.
    Bench(cli::bench::BenchArgs),
    /// Load a model (quantizing it with `--quant`) and save it as one GGUF file that loads in
    /// seconds: `--model FILE.gguf` then works everywhere a model directory does.
    #[command(arg_required_else_help = true)]
    Convert(cli::convert::ConvertArgs),
    /// Serve the model: AIHub's `aihub.ChatHub` gRPC protocol (`--listen`) and an
    /// OpenAI-compatible HTTP API with a web chat page (`--http`), either or both.
    #[cfg(any(feature = "grpc", feature = "http"))]
    Serve(cli::serve::ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chathub: error: {}", describe(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: the core's errors already name their
/// cause in their message, and repeating it as "Caused by" only doubles the text.
fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Chat(args) => cli::chat::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Convert(args) => cli::convert::run(args),
        #[cfg(any(feature = "grpc", feature = "http"))]
        Command::Serve(args) => cli::serve::run(args),
    }
}
