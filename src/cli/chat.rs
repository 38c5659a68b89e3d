//! `chathub chat`: an interactive multi-turn chat with streamed replies.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

use chathub::{ChatRequest, FinishReason, Message, Reply, ToolCall};
use clap::Args;

use super::{ModelArgs, SamplingArgs};

/// Flags of `chathub chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    sampling: SamplingArgs,

    /// A system prompt (honoured by ChatGLM3; ChatGLM2's format has no place for one).
    #[arg(long)]
    system: Option<String>,

    /// Longest input line, in bytes; a longer one is reported and skipped.
    #[arg(long, env = "CHATHUB_MAX_LINE_BYTES", default_value_t = 1 << 20)]
    max_line_bytes: usize,
}

/// Why an input line was skipped.
enum BadLine {
    TooLong,
    NotUtf8,
}

/// The next line of `input` without its newline, reading at most `limit` bytes of it into
/// memory (the rest of a longer line is read and dropped); `None` at the end of input.
fn next_line(
    input: &mut impl BufRead,
    limit: usize,
) -> std::io::Result<Option<Result<String, BadLine>>> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut any = false;
    loop {
        let buffer = input.fill_buf()?;
        if buffer.is_empty() {
            break;
        }
        any = true;
        let (chunk, ends) = match buffer.iter().position(|&b| b == b'\n') {
            Some(i) => (&buffer[..i], Some(i + 1)),
            None => (buffer, None),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = ends.unwrap_or(buffer.len());
        input.consume(used);
        if ends.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if too_long {
        return Ok(Some(Err(BadLine::TooLong)));
    }
    Ok(Some(String::from_utf8(line).map_err(|_| BadLine::NotUtf8)))
}

/// Runs the chat loop until end of input or `/exit`.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let engine = args.model.load()?;
    let interactive = std::io::stdin().is_terminal();
    let initial: Vec<Message> = args.system.iter().map(Message::system).collect();
    let mut history = initial.clone();
    if interactive {
        eprintln!(
            "chathub: chatting with {} ({}). /reset clears the history, /exit quits.",
            engine.dir().display(),
            engine.family()
        );
    }
    let mut stdout = std::io::stdout();
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut number = 0usize;
    loop {
        if interactive {
            eprint!("\n> ");
        }
        let Some(line) = next_line(&mut input, args.max_line_bytes)? else {
            break;
        };
        number += 1;
        let line = match line {
            Ok(line) => line,
            Err(BadLine::TooLong) => {
                eprintln!(
                    "chathub: line {number} is longer than {} bytes (--max-line-bytes): skipped",
                    args.max_line_bytes
                );
                continue;
            }
            Err(BadLine::NotUtf8) => {
                eprintln!("chathub: line {number} is not valid UTF-8: skipped");
                continue;
            }
        };
        let prompt = line.trim_end_matches('\r');
        match prompt.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = initial.clone();
                eprintln!("chathub: history cleared");
                continue;
            }
            _ => {}
        }
        let request = args
            .sampling
            .apply(ChatRequest::new(prompt).history(history.clone()));
        if !interactive {
            writeln!(stdout, "> {prompt}")?;
        }
        let outcome = engine.chat_stream(&request, |delta| {
            let written = write!(stdout, "{delta}").and_then(|()| stdout.flush());
            // A closed stdout (e.g. `| head`) ends the reply.
            if written.is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        match &outcome.reply {
            Reply::ToolCall { name, arguments } => writeln!(
                stdout,
                "[tool call] {name} {}",
                serde_json::Value::Object(arguments.clone())
            )?,
            Reply::Metadata { name, content } => writeln!(stdout, "[{name}]\n{content}")?,
            _ => writeln!(stdout)?,
        }
        eprintln!(
            "[{} prompt + {} reply tokens, {:.1} tokens/s, first token after {:.0} ms, {}]",
            outcome.usage.prompt_tokens,
            outcome.usage.completion_tokens,
            outcome.timings.decode_tokens_per_s,
            outcome.timings.ttft_ms,
            match outcome.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length limit",
                FinishReason::Cancelled => "cancelled",
                FinishReason::ToolCalls => "tool call",
                _ => "finished",
            }
        );
        history.push(Message::user(prompt));
        history.push(match outcome.reply {
            Reply::ToolCall { name, arguments } => Message::assistant_tool_calls(
                "",
                vec![ToolCall::new(&name, serde_json::Value::Object(arguments))],
            ),
            _ => Message::assistant(outcome.text),
        });
    }
    Ok(())
}
