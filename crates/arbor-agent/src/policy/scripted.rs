//! `scripted-oracle`: an OpenAI-compatible endpoint that replays a fixed list
//! of shell commands per task through whichever protocol the client uses
//! (a fenced ```bash block, or a call of the client's own shell tool, found
//! by [`ShellTool`] whatever its name and argument schema), then ends the
//! episode the way that client ends.
//!
//! It is stateless: the task is recognised by the conversation's first user
//! message quoting it and the step by the number of assistant messages so far, so
//! retries and resumed runs replay identically. It exists to test and load
//! the infrastructure; results produced with it say nothing about a model.
//!
//! # Finding the task
//!
//! arbor's own scaffolds send the instruction itself as the first user
//! message, but third-party agents wrap it in a prompt template (e.g.
//! mini-swe-agent's `Please solve this issue: {{task}}` followed by its
//! rules). So the lookup is: the script registered under exactly the first
//! user message if there is one; otherwise the script whose instruction is
//! the *longest* registered instruction contained in that message (the most
//! specific one: with `"Fix a"` and `"Fix a bug"` both registered, a prompt
//! quoting `"Fix a bug"` gets the latter). Two different instructions of
//! that same greatest length both contained in the message are ambiguous and
//! answered with 409 rather than guessed. The first user message with a
//! match decides: some agents (Codex) send context messages before the task.
//!
//! # Ending the episode
//!
//! After its commands a script ends the episode the way the agent expects
//! ([`Script::submit_command`]): by default with the word `submit` in a
//! fenced block, a `submit` tool call when the client offers one (arbor's
//! scaffolds), or else a final answer with no tool call (agent CLIs such as
//! Claude Code, Codex and OpenCode stop there); or with an ordinary command,
//! for agents that finish when a command prints a sentinel. mini-swe-agent's
//! sentinel (`echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`) and its text-mode
//! fence are taken from its own prompt when the script names none.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use arbor_trace::byte_chat::{content_text, encode, message_text, render_prompt, token_name};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::shell_tool::ShellTool;

/// Name used in reports.
pub const NAME: &str = "scripted-oracle";

type Scripts = Arc<RwLock<HashMap<String, Script>>>;

/// What the policy replays for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// Shell commands, one per model call.
    pub commands: Vec<String>,
    /// How the episode ends once the commands are used up. `None`: the word
    /// `submit` in a fenced block, or a `submit` tool call (arbor's
    /// scaffolds). `Some(cmd)`: `cmd` sent as one more ordinary action (a
    /// fenced block or a `bash` tool call), for agents that stop on a
    /// command's output. Repeated if the agent keeps asking.
    pub submit_command: Option<String>,
    /// Info string of the fenced block in text replies (` ```bash `). Agents
    /// parse their own fence: mini-swe-agent's text mode wants
    /// `mswea_bash_command`.
    pub fence: String,
}

impl Script {
    /// `commands`, then `submit`, in ` ```bash ` blocks (what [`ScriptedPolicy::register`] uses).
    pub fn new(commands: Vec<String>) -> Self {
        Script {
            commands,
            submit_command: None,
            fence: "bash".to_string(),
        }
    }

    /// End with `command` as an ordinary action instead of `submit`.
    pub fn with_submit_command(mut self, command: impl Into<String>) -> Self {
        self.submit_command = Some(command.into());
        self
    }

    /// Use ` ```{fence} ` blocks in text replies.
    pub fn with_fence(mut self, fence: impl Into<String>) -> Self {
        self.fence = fence.into();
        self
    }

    /// The action of step `step` (0-based): a command, or `None` for `submit`.
    fn action(&self, step: usize) -> Option<&str> {
        self.commands
            .get(step)
            .or(self.submit_command.as_ref())
            .map(String::as_str)
    }
}

/// A running scripted policy server.
pub struct ScriptedPolicy {
    scripts: Scripts,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl ScriptedPolicy {
    /// Serve on `addr` (use port 0 for any free port on loopback).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let scripts: Scripts = Arc::default();
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .route("/v1/models", get(models))
            .with_state(scripts.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("scripted policy server: {e}");
            }
        });
        Ok(ScriptedPolicy {
            scripts,
            addr,
            server,
        })
    }

    /// Base URL including `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Replay `commands` (then submit) for conversations whose first user
    /// message is `instruction` (or quotes it: see the module docs).
    pub fn register(&self, instruction: &str, commands: Vec<String>) {
        self.register_script(instruction, Script::new(commands));
    }

    /// Replay `commands`, then end with `submit_command` run as an ordinary
    /// command (e.g. mini-swe-agent's `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`).
    pub fn register_with_submit(
        &self,
        instruction: &str,
        commands: Vec<String>,
        submit_command: &str,
    ) {
        self.register_script(
            instruction,
            Script::new(commands).with_submit_command(submit_command),
        );
    }

    /// Replay `script` for conversations about `instruction`.
    pub fn register_script(&self, instruction: &str, script: Script) {
        if let Ok(mut s) = self.scripts.write() {
            s.insert(instruction.to_string(), script);
        }
    }
}

impl Drop for ScriptedPolicy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": NAME, "object": "model", "owned_by": "arbor"}]}))
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

async fn complete(State(scripts): State<Scripts>, Json(req): Json<Value>) -> Response {
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`messages` must be an array".into(),
        );
    };
    let users: Vec<String> = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .filter_map(|m| m.get("content").and_then(content_text))
        .flat_map(with_unquoted)
        .collect();
    if users.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no user message".into());
    }
    let step = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .count();
    let script = match scripts.read() {
        Ok(s) => match find_script_in(&s, &users) {
            Lookup::Found(script) => script.clone(),
            Lookup::Missing => {
                return error(
                    StatusCode::NOT_FOUND,
                    "scripted-oracle has no script for this task".into(),
                );
            }
            Lookup::Ambiguous(a, b) => {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "scripted-oracle: a user message contains two registered instructions of equal length ({a:?}, {b:?})"
                    ),
                );
            }
        },
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "script table poisoned".into(),
            );
        }
    };
    let script = adapt_to_client(script, messages);
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let (message, finish) = reply(&script, step, tools);
    // Token ids: the byte chat format the embedded policy is served with, so each call's
    // prompt extends the previous prompt + completion exactly as with a real tokenizer and an
    // oracle trajectory is training data for the embedded model; a scripted reply is certain,
    // so every logprob is 0.
    let prompt_ids = render_prompt(messages);
    let completion_ids = encode(&message_text(&message));
    let logprobs: Vec<Value> = completion_ids
        .iter()
        .map(|&b| json!({"token": token_name(b), "logprob": 0.0, "bytes": [b], "top_logprobs": []}))
        .collect();
    let usage = json!({"prompt_tokens": prompt_ids.len(), "completion_tokens": completion_ids.len(),
                       "total_tokens": prompt_ids.len() + completion_ids.len()});
    let tokens = TokenInfo {
        prompt_ids,
        completion_ids,
        logprobs,
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or(NAME);
    let id = format!("chatcmpl-scripted-{step}");
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return stream(&id, model, message, finish, usage, tokens);
    }
    Json(json!({
        "id": id, "object": "chat.completion", "created": 0, "model": model,
        "prompt_token_ids": tokens.prompt_ids,
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "token_ids": tokens.completion_ids, "logprobs": {"content": tokens.logprobs}}],
        "usage": usage,
    }))
    .into_response()
}

/// mini-swe-agent's end-of-episode sentinel: a command whose output starts
/// with it ends the episode. Its prompts spell it out.
const MINI_SENTINEL: &str = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT";
/// mini-swe-agent's fence in text mode.
const MINI_FENCE: &str = "mswea_bash_command";

/// A script registered without a client in mind, adjusted to the
/// conventions the client's own prompt states: mini-swe-agent ends on its
/// sentinel command and, in text mode, reads its own fence.
fn adapt_to_client(mut script: Script, messages: &[Value]) -> Script {
    let prompt_mentions = |needle: &str| {
        messages.iter().any(|m| {
            matches!(
                m.get("role").and_then(Value::as_str),
                Some("system" | "user")
            ) && m
                .get("content")
                .and_then(content_text)
                .is_some_and(|c| c.contains(needle))
        })
    };
    if script.submit_command.is_none() && prompt_mentions(MINI_SENTINEL) {
        script.submit_command = Some(format!("echo {MINI_SENTINEL}"));
    }
    if script.fence == "bash" && prompt_mentions(&format!("```{MINI_FENCE}")) {
        script.fence = MINI_FENCE.to_string();
    }
    script
}

/// The reply at step `step` and its finish reason. With tools: the command
/// through the client's shell tool ([`ShellTool`]); at the end a `submit`
/// call when one is offered (arbor's scaffolds), else a final answer with no
/// tool call, the way agent CLIs end. Without tools: a fenced block.
fn reply(script: &Script, step: usize, tools: &[Value]) -> (Value, &'static str) {
    let command = script.action(step);
    if tools.is_empty() {
        let c = command.unwrap_or("submit");
        let content = format!("```{}\n{c}\n```", script.fence);
        return (json!({"role": "assistant", "content": content}), "stop");
    }
    let offers = |name: &str| {
        tools
            .iter()
            .any(|t| t["function"]["name"].as_str() == Some(name))
    };
    let (name, args) = match command {
        Some(c) => match ShellTool::find(tools) {
            Some(shell) => (shell.name.clone(), shell.arguments(c)),
            None => ("bash".to_string(), json!({"command": c})),
        },
        None if offers("submit") => ("submit".to_string(), json!({})),
        None => {
            let done = "The task is done.";
            return (json!({"role": "assistant", "content": done}), "stop");
        }
    };
    let call = json!({"id": format!("call_{step}"), "type": "function",
                      "function": {"name": name, "arguments": args.to_string()}});
    (
        json!({"role": "assistant", "content": null, "tool_calls": [call]}),
        "tool_calls",
    )
}

/// Result of looking a conversation's task up.
#[derive(Debug)]
enum Lookup<'a> {
    Found(&'a Script),
    Missing,
    Ambiguous(&'a str, &'a str),
}

/// The script for a conversation whose first user message is `first`: an
/// exact match, else the longest registered instruction contained in it
/// (see the module docs). Exact matches cost one hash lookup; the scan only
/// runs for templated prompts.
fn find_script<'a>(scripts: &'a HashMap<String, Script>, first: &str) -> Lookup<'a> {
    if let Some(s) = scripts.get(first) {
        return Lookup::Found(s);
    }
    let mut best: Option<(&'a str, &'a Script)> = None;
    let mut tie: Option<&'a str> = None;
    for (instruction, script) in scripts {
        if instruction.is_empty() || !first.contains(instruction.as_str()) {
            continue;
        }
        match best {
            Some((b, _)) if b.len() > instruction.len() => {}
            Some((b, _)) if b.len() == instruction.len() => tie = Some(instruction),
            _ => {
                best = Some((instruction, script));
                tie = None;
            }
        }
    }
    match (best, tie) {
        (Some((b, _)), Some(t)) => Lookup::Ambiguous(b, t),
        (Some((_, s)), None) => Lookup::Found(s),
        (None, _) => Lookup::Missing,
    }
}

/// A user message, and the string it spells when it is a JSON string
/// literal (OpenCode quotes the task that way in its title request).
fn with_unquoted(text: String) -> Vec<String> {
    let t = text.trim();
    let unquoted = (t.len() >= 2 && t.starts_with('"') && t.ends_with('"'))
        .then(|| serde_json::from_str::<String>(t).ok())
        .flatten();
    std::iter::once(text).chain(unquoted).collect()
}

/// The script of a conversation: the first user message with a match
/// decides (agents such as Codex send context messages before the task).
fn find_script_in<'a>(scripts: &'a HashMap<String, Script>, users: &[String]) -> Lookup<'a> {
    for u in users {
        match find_script(scripts, u) {
            Lookup::Missing => continue,
            found => return found,
        }
    }
    Lookup::Missing
}

/// Token ids and logprobs of one reply.
struct TokenInfo {
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    logprobs: Vec<Value>,
}

/// The same reply as a stream: one delta with the whole message, then the
/// finish chunk, a usage chunk and `[DONE]`.
fn stream(
    id: &str,
    model: &str,
    message: Value,
    finish: &str,
    usage: Value,
    tokens: TokenInfo,
) -> Response {
    let mut delta = message.clone();
    if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
        for (i, c) in calls.iter_mut().enumerate() {
            c["index"] = json!(i);
        }
    }
    let chunk = |choices: Value, usage: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": choices, "usage": usage})
    };
    let mut first = chunk(
        json!([{"index": 0, "delta": delta, "finish_reason": null,
                "token_ids": tokens.completion_ids, "logprobs": {"content": tokens.logprobs}}]),
        Value::Null,
    );
    first["prompt_token_ids"] = json!(tokens.prompt_ids);
    let events = [
        first,
        chunk(
            json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
            Value::Null,
        ),
        chunk(json!([]), usage),
    ];
    let mut body = String::new();
    for e in events {
        body.push_str(&format!("data: {e}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(instructions: &[&str]) -> HashMap<String, Script> {
        instructions
            .iter()
            .map(|i| (i.to_string(), Script::new(vec![format!("echo {i}")])))
            .collect()
    }

    fn found(t: &HashMap<String, Script>, first: &str) -> Option<String> {
        match find_script(t, first) {
            Lookup::Found(s) => Some(s.commands[0].clone()),
            _ => None,
        }
    }

    #[test]
    fn exact_match_then_longest_contained_instruction() {
        let t = table(&["Fix a", "Fix a bug", "Other task"]);
        assert_eq!(found(&t, "Fix a").as_deref(), Some("echo Fix a"));
        // A templated prompt quoting the instruction finds the most specific one.
        assert_eq!(
            found(&t, "Please solve this issue: Fix a bug\n\nRules...").as_deref(),
            Some("echo Fix a bug")
        );
        assert_eq!(
            found(&t, "Please solve: Fix a typo").as_deref(),
            Some("echo Fix a")
        );
        assert!(matches!(find_script(&t, "unrelated"), Lookup::Missing));
    }

    #[test]
    fn equal_length_matches_are_ambiguous() {
        let t = table(&["task A", "task B"]);
        assert!(matches!(
            find_script(&t, "do task A and task B"),
            Lookup::Ambiguous(..)
        ));
        // An exact match is never ambiguous.
        assert!(matches!(find_script(&t, "task A"), Lookup::Found(_)));
    }

    #[test]
    fn submit_command_follows_the_commands_and_repeats() {
        let s = Script::new(vec!["ls".into()]).with_submit_command("echo DONE");
        assert_eq!(s.action(0), Some("ls"));
        assert_eq!(s.action(1), Some("echo DONE"));
        assert_eq!(s.action(5), Some("echo DONE"));
        assert_eq!(Script::new(vec!["ls".into()]).action(1), None);
    }

    fn tool(name: &str, params: Value) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": params}})
    }

    #[test]
    fn agent_clis_get_their_shell_tool_then_a_final_answer() {
        let s = Script::new(vec!["ls".into()]);
        let claude = [tool(
            "Bash",
            json!({"properties": {"command": {"type": "string"}}, "required": ["command"]}),
        )];
        let (m, finish) = reply(&s, 0, &claude);
        assert_eq!(finish, "tool_calls");
        let f = &m["tool_calls"][0]["function"];
        assert_eq!(f["name"], "Bash");
        assert_eq!(f["arguments"], json!({"command": "ls"}).to_string());
        // No submit tool offered: the episode ends with text and no tool call.
        let (m, finish) = reply(&s, 1, &claude);
        assert_eq!(finish, "stop");
        assert!(m.get("tool_calls").is_none() && m["content"].is_string());
        // arbor's tools scaffold offers `submit`, which ends its episodes.
        let mut arbor = claude.to_vec();
        arbor.push(tool("submit", json!({"properties": {}})));
        let (m, _) = reply(&s, 1, &arbor);
        assert_eq!(m["tool_calls"][0]["function"]["name"], "submit");
        // Without tools: fenced blocks.
        let (m, _) = reply(&s, 1, &[]);
        assert_eq!(m["content"], "```bash\nsubmit\n```");
    }

    #[test]
    fn the_task_is_found_in_any_user_message_and_mini_ends_with_its_sentinel() {
        let t = table(&["Create a.txt"]);
        let users = vec![
            "<environment_context>cwd</environment_context>".to_string(),
            "Create a.txt".to_string(),
        ];
        assert!(matches!(find_script_in(&t, &users), Lookup::Found(_)));
        assert_eq!(
            with_unquoted("\"say \\\"hi\\\"\"".into()),
            vec!["\"say \\\"hi\\\"\"".to_string(), "say \"hi\"".to_string()]
        );
        let mini = [
            json!({"role": "system", "content": "When done: `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`"}),
        ];
        let s = adapt_to_client(Script::new(vec![]), &mini);
        assert_eq!(
            s.action(0),
            Some("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT")
        );
        let plain = adapt_to_client(
            Script::new(vec![]),
            &[json!({"role": "user", "content": "x"})],
        );
        assert_eq!(plain.action(0), None);
    }
}
