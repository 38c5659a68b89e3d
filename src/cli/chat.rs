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
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("\n> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
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
