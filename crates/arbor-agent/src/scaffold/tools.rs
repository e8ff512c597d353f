//! The `tools` scaffold: OpenAI function calling with `bash`, a file editor
//! (`str_replace_based_edit_tool`) and `submit`.

use std::time::{Duration, Instant};

use arbor_sandbox::Sandbox;
use async_trait::async_trait;
use serde_json::{Value, json};

use super::editor::{EditArgs, Editor};
use super::{EpisodeOutcome, Scaffold, ScaffoldConfig, StopReason, Tally, run_command};
use crate::client::{ChatClient, ChatMessage};
use crate::error::AgentError;

const SYSTEM_PROMPT: &str = "You are a capable software engineer. Use the tools to inspect and change \
files and to run commands. Call `submit` when the task is complete.";

const NO_TOOL: &str = "Please continue by calling one of the tools (`bash`, \
`str_replace_based_edit_tool`, or `submit` when you are done).";

/// Function-calling scaffold.
#[derive(Debug, Clone, Default)]
pub struct ToolsScaffold {
    pub config: ScaffoldConfig,
}

/// The tool schemas sent with every request.
pub fn tool_schemas() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "bash",
            "description": "Run a shell command; returns its exit code and output.",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string", "description": "The command to run with bash -c."}
            }, "required": ["command"]}
        }},
        {"type": "function", "function": {
            "name": "str_replace_based_edit_tool",
            "description": "View, create and edit files. Paths are absolute.",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
                "path": {"type": "string"},
                "file_text": {"type": "string", "description": "create: the whole file"},
                "old_str": {"type": "string", "description": "str_replace: text occurring exactly once"},
                "new_str": {"type": "string", "description": "str_replace / insert: new text"},
                "insert_line": {"type": "integer", "description": "insert: after this line (0 = top)"},
                "view_range": {"type": "array", "items": {"type": "integer"}, "description": "view: [first, last] lines, last -1 = end"}
            }, "required": ["command", "path"]}
        }},
        {"type": "function", "function": {
            "name": "submit",
            "description": "Finish the task.",
            "parameters": {"type": "object", "properties": {}}
        }}
    ])
}

#[async_trait]
impl Scaffold for ToolsScaffold {
    fn name(&self) -> &str {
        "tools"
    }

    async fn run(
        &self,
        sandbox: &dyn Sandbox,
        instruction: &str,
        model: &ChatClient,
    ) -> Result<EpisodeOutcome, AgentError> {
        let cfg: &ScaffoldConfig = &self.config;
        let tools = tool_schemas();
        let mut history = vec![
            ChatMessage::text(
                "system",
                cfg.system_prompt.as_deref().unwrap_or(SYSTEM_PROMPT),
            ),
            ChatMessage::text("user", instruction),
        ];
        let mut editor = Editor::default();
        let mut tally = Tally::new();
        for turn in 0..cfg.max_steps {
            if tally.over_budget(cfg) {
                tally.outcome.stop = StopReason::TokenLimit;
                return Ok(tally.outcome);
            }
            let (reply, model_time, rewritten) = tally
                .call_model(cfg, model, &mut history, Some(&tools), turn)
                .await?;
            let calls = reply.message.tool_calls.clone();
            history.push(reply.message);
            if calls.is_empty() {
                tally.outcome.format_errors += 1;
                history.push(ChatMessage::text("user", NO_TOOL));
                tally.record("no tool call".into(), model_time, Duration::ZERO, rewritten);
                continue;
            }
            let mut act_time = Duration::ZERO;
            let mut actions = Vec::new();
            let mut submitted = false;
            // Every call gets an answer, so the history stays valid for the API.
            for call in &calls {
                let args: Result<Value, _> =
                    serde_json::from_str(if call.function.arguments.trim().is_empty() {
                        "{}"
                    } else {
                        &call.function.arguments
                    });
                let answer = match (call.function.name.as_str(), args) {
                    (_, Err(e)) => {
                        tally.outcome.format_errors += 1;
                        format!("Error: arguments are not valid JSON: {e}")
                    }
                    ("submit", Ok(_)) => {
                        submitted = true;
                        actions.push("submit".to_string());
                        "Submitted.".to_string()
                    }
                    ("bash", Ok(v)) => match v.get("command").and_then(Value::as_str) {
                        Some(cmd) => {
                            let (obs, d) = run_command(sandbox, cmd, cfg).await?;
                            act_time += d;
                            actions.push(cmd.to_string());
                            obs
                        }
                        None => {
                            tally.outcome.format_errors += 1;
                            "Error: `bash` needs a string `command`".to_string()
                        }
                    },
                    ("str_replace_based_edit_tool", Ok(v)) => {
                        match serde_json::from_value::<EditArgs>(v) {
                            Ok(a) => {
                                actions.push(format!("edit {} {}", a.command, a.path));
                                let t = Instant::now();
                                let out = editor.call(sandbox, a).await?;
                                act_time += t.elapsed();
                                out
                            }
                            Err(e) => {
                                tally.outcome.format_errors += 1;
                                format!("Error: bad editor arguments: {e}")
                            }
                        }
                    }
                    (other, Ok(_)) => {
                        tally.outcome.format_errors += 1;
                        format!("Error: unknown tool {other:?}")
                    }
                };
                history.push(ChatMessage::tool(&call.id, answer));
            }
            tally.record(actions.join("; "), model_time, act_time, rewritten);
            if submitted {
                tally.outcome.stop = StopReason::Submitted;
                return Ok(tally.outcome);
            }
        }
        tally.outcome.stop = StopReason::StepLimit;
        Ok(tally.outcome)
    }
}
