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

/// Has glibc keep freed memory for the next allocation instead of handing it back to the
/// kernel. A forward pass allocates its activations and frees them at the end (a 256-token
/// prefill chunk of a 6B model, some 90 MB per layer); glibc's adaptive thresholds returned
/// that memory between passes, so every pass faulted it in again and the kernel zeroed it page
/// by page, a tenth of 6B prefill's time in a `perf` profile. Kept memory is only faster where
/// nothing zeroes it again on one thread, which is why the products write into unzeroed
/// buffers (`BlockMatrix::matmul_uninit`): with both, 6B q4_0 prefill (`chathub bench
/// --synthetic 6b --quant q4_0 --prompt-tokens 512`) ran at 48.0 / 47.3 / 52.1 tokens/s against
/// 39.3 / 46.3 / 48.9 in three same-round pairs. A setting for the whole process, so it is the
/// program's to make, not the library's: programs embedding chathub can set
/// `GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=33554432`.
fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters, and runs before any other
    // thread exists. 32 MiB is the largest mmap threshold glibc takes; larger blocks are
    // still mapped and unmapped on their own.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
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
    retain_freed_memory();
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
