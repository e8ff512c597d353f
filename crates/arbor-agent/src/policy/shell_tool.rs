//! Finding a client's shell tool among the Chat Completions `tools` of a
//! request, and writing a command as that tool's arguments.
//!
//! Every agent CLI names and shapes its shell tool its own way: Claude Code
//! `Bash {command, description?, timeout?}`, Codex `shell {command: [argv]}`
//! or `exec_command {cmd}`, OpenCode `bash {command, description}`,
//! mini-swe-agent and arbor's own scaffold `bash {command}`. A namespaced
//! tool flattened by the gateway keeps the function's name as its last
//! segment (`functions.exec_command`, `shell__exec_command`). So a tool is a
//! shell tool when its last name segment is a known shell-tool name and its
//! parameters have a command property (a string, or an array of strings: an
//! argv, which gets `bash -lc <command>`).

use serde_json::{Map, Value, json};

/// Last name segments of shell tools, most specific first (a request
/// offering several is answered through the earliest in this list).
const SHELL_NAMES: &[&str] = &[
    "bash",
    "shell",
    "exec_command",
    "local_shell",
    "run_shell_command",
    "shell_command",
    "execute_command",
    "terminal",
];

/// Property names that hold the command, in order of preference.
const COMMAND_PROPS: &[&str] = &["command", "cmd", "commands"];

/// What a required string property without a known meaning is given (e.g.
/// OpenCode's `description`).
const DESCRIPTION: &str = "Run the next step of the task";

/// A shell tool found in a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ShellTool {
    /// The function name to call, exactly as offered.
    pub name: String,
    command_prop: String,
    argv: bool,
    /// Required string/boolean properties other than the command.
    extra_required: Vec<(String, Value)>,
}

impl ShellTool {
    /// The shell tool among `tools` (Chat Completions format), if any.
    pub fn find(tools: &[Value]) -> Option<ShellTool> {
        let mut best: Option<(usize, ShellTool)> = None;
        for t in tools {
            let Some(f) = t.get("function") else { continue };
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                continue;
            };
            let Some(rank) = SHELL_NAMES
                .iter()
                .position(|n| last_segment(name).eq_ignore_ascii_case(n))
            else {
                continue;
            };
            let Some(tool) = Self::from_schema(name, f.get("parameters")) else {
                continue;
            };
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, tool));
            }
        }
        best.map(|(_, t)| t)
    }

    fn from_schema(name: &str, params: Option<&Value>) -> Option<ShellTool> {
        let props = params?.get("properties")?.as_object()?;
        let (prop, schema) = COMMAND_PROPS
            .iter()
            .find_map(|p| props.get(*p).map(|s| (*p, s)))?;
        let argv = match schema.get("type").and_then(Value::as_str) {
            Some("array") => true,
            Some("string") | None => false,
            Some(_) => return None,
        };
        let required: Vec<&str> = params?
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let extra_required = required
            .into_iter()
            .filter(|r| *r != prop)
            .filter_map(|r| {
                let value = match props.get(r)?.get("type").and_then(Value::as_str)? {
                    "string" => json!(DESCRIPTION),
                    "boolean" => json!(false),
                    _ => return None,
                };
                Some((r.to_string(), value))
            })
            .collect();
        Some(ShellTool {
            name: name.to_string(),
            command_prop: prop.to_string(),
            argv,
            extra_required,
        })
    }

    /// `command` as this tool's JSON arguments.
    pub fn arguments(&self, command: &str) -> Value {
        let mut args = Map::new();
        let value = if self.argv {
            json!(["bash", "-lc", command])
        } else {
            json!(command)
        };
        args.insert(self.command_prop.clone(), value);
        for (k, v) in &self.extra_required {
            args.insert(k.clone(), v.clone());
        }
        Value::Object(args)
    }
}

/// `a.b.c` → `c`, `ns__exec` → `exec`, `ns/exec` → `exec`.
fn last_segment(name: &str) -> &str {
    let after = |s: &'static str| name.rsplit(s).next().unwrap_or(name);
    [".", "__", "/", ":"]
        .into_iter()
        .map(after)
        .min_by_key(|s| s.len())
        .unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, params: Value) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": params}})
    }

    #[test]
    fn finds_each_clients_shell_tool_and_fills_its_arguments() {
        // Claude Code: `Bash`, command string, optional extras left out.
        let claude = [
            tool(
                "Read",
                json!({"properties": {"file_path": {"type": "string"}}}),
            ),
            tool(
                "Bash",
                json!({"properties": {"command": {"type": "string"}, "timeout": {"type": "number"},
                       "description": {"type": "string"}}, "required": ["command"]}),
            ),
        ];
        let t = ShellTool::find(&claude).expect("Bash");
        assert_eq!(t.name, "Bash");
        assert_eq!(t.arguments("ls"), json!({"command": "ls"}));

        // Codex: `shell` with an argv array.
        let codex = [tool(
            "shell",
            json!({"properties": {"command": {"type": "array", "items": {"type": "string"}},
                   "workdir": {"type": "string"}}, "required": ["command"]}),
        )];
        let t = ShellTool::find(&codex).expect("shell");
        assert_eq!(
            t.arguments("ls -l"),
            json!({"command": ["bash", "-lc", "ls -l"]})
        );

        // Codex's newer `exec_command {cmd}`, flattened out of a namespace.
        let flat = [tool(
            "functions.exec_command",
            json!({"properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}),
        )];
        let t = ShellTool::find(&flat).expect("exec_command");
        assert_eq!(t.name, "functions.exec_command");
        assert_eq!(t.arguments("pwd"), json!({"cmd": "pwd"}));

        // OpenCode: `description` is required too.
        let opencode = [tool(
            "bash",
            json!({"properties": {"command": {"type": "string"}, "description": {"type": "string"}},
                   "required": ["command", "description"]}),
        )];
        let args = ShellTool::find(&opencode).expect("bash").arguments("true");
        assert_eq!(args["command"], "true");
        assert!(args["description"].as_str().is_some_and(|d| !d.is_empty()));
    }

    #[test]
    fn prefers_bash_and_ignores_tools_without_a_command() {
        let tools = [
            tool(
                "shell",
                json!({"properties": {"command": {"type": "string"}}}),
            ),
            tool(
                "bash",
                json!({"properties": {"command": {"type": "string"}}}),
            ),
        ];
        assert_eq!(ShellTool::find(&tools).expect("tool").name, "bash");
        let none = [
            tool(
                "bash",
                json!({"properties": {"script_path": {"type": "string"}}}),
            ),
            tool(
                "grep",
                json!({"properties": {"command": {"type": "string"}}}),
            ),
        ];
        assert_eq!(ShellTool::find(&none), None);
    }
}
