//! The `bash` scaffold: each assistant turn holds one shell command in a
//! fenced block; its output comes back as the next user message; the
//! episode ends when the agent runs `submit` or hits a limit.

use std::time::Duration;

use arbor_sandbox::Sandbox;
use async_trait::async_trait;

use super::{EpisodeOutcome, Scaffold, ScaffoldConfig, StopReason, Tally, run_command};
use crate::client::{ChatClient, ChatMessage};
use crate::error::AgentError;

/// The command that ends an episode.
pub const SUBMIT: &str = "submit";

const SYSTEM_PROMPT: &str = "You are a capable software engineer working in a Linux shell.\n\
Each reply must contain exactly one shell command in a ```bash fenced block; you will get its \
exit code and output back. Work step by step. When the task is complete, reply with a block \
containing only `submit`.";

const FORMAT_ERROR: &str = "Your reply must contain exactly one ```bash fenced block with one command \
(or `submit` when you are done). Please try again.";

/// The minimal shell-command loop.
#[derive(Debug, Clone, Default)]
pub struct BashScaffold {
    pub config: ScaffoldConfig,
}

/// Extract the single ```bash (or ```sh / bare ```) block of a reply.
/// More than one block, or none, is a format error.
pub fn parse_command(reply: &str) -> Option<String> {
    let mut blocks = Vec::new();
    let mut rest = reply;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let line_end = after.find('\n')?;
        let lang = after[..line_end].trim();
        let body = &after[line_end + 1..];
        let end = body.find("```")?;
        if matches!(lang, "bash" | "sh" | "shell" | "") {
            blocks.push(body[..end].trim().to_string());
        }
        rest = &body[end + 3..];
    }
    match blocks.as_slice() {
        [one] if !one.is_empty() => Some(one.clone()),
        _ => None,
    }
}

#[async_trait]
impl Scaffold for BashScaffold {
    fn name(&self) -> &str {
        "bash"
    }

    async fn run(
        &self,
        sandbox: &dyn Sandbox,
        instruction: &str,
        model: &ChatClient,
    ) -> Result<EpisodeOutcome, AgentError> {
        let cfg = &self.config;
        let mut history = vec![
            ChatMessage::text(
                "system",
                cfg.system_prompt.as_deref().unwrap_or(SYSTEM_PROMPT),
            ),
            ChatMessage::text("user", instruction),
        ];
        let mut tally = Tally::new();
        for turn in 0..cfg.max_steps {
            if tally.over_budget(cfg) {
                tally.outcome.stop = StopReason::TokenLimit;
                return Ok(tally.outcome);
            }
            let (reply, model_time, rewritten) = tally
                .call_model(cfg, model, &mut history, None, turn)
                .await?;
            let text = reply.message.content.clone().unwrap_or_default();
            history.push(ChatMessage::text("assistant", text.clone()));
            let Some(command) = parse_command(&text) else {
                tally.outcome.format_errors += 1;
                history.push(ChatMessage::text("user", FORMAT_ERROR));
                tally.record("format error".into(), model_time, Duration::ZERO, rewritten);
                continue;
            };
            if command == SUBMIT {
                tally.record(SUBMIT.into(), model_time, Duration::ZERO, rewritten);
                tally.outcome.stop = StopReason::Submitted;
                return Ok(tally.outcome);
            }
            let (obs, act_time) = run_command(sandbox, &command, cfg).await?;
            history.push(ChatMessage::text("user", obs));
            tally.record(command, model_time, act_time, rewritten);
        }
        tally.outcome.stop = StopReason::StepLimit;
        Ok(tally.outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_command;

    #[test]
    fn one_block_is_a_command() {
        assert_eq!(
            parse_command("Let me look.\n```bash\nls -la\n```\n").as_deref(),
            Some("ls -la")
        );
        assert_eq!(parse_command("```\nsubmit\n```").as_deref(), Some("submit"));
    }

    #[test]
    fn zero_or_two_blocks_or_unclosed_are_errors() {
        assert_eq!(parse_command("no block here"), None);
        assert_eq!(parse_command("```bash\nls\n```\n```bash\npwd\n```"), None);
        assert_eq!(parse_command("```bash\nls"), None);
        assert_eq!(parse_command("```bash\n\n```"), None);
    }

    #[test]
    fn other_languages_are_not_commands() {
        assert_eq!(
            parse_command("```python\nprint(1)\n```\n```bash\necho hi\n```").as_deref(),
            Some("echo hi")
        );
    }
}
