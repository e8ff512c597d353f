//! Dockerfiles as build plans. Parsing is `parse-dockerfile`'s; this module
//! turns its syntax tree into [`Stage`]s of [`Step`]s that carry their line
//! (errors name `file:line`) and refuses what arbor does not build, with the
//! instruction named, instead of building something different from Docker.
//!
//! Built: FROM (multi-stage, `AS name`), RUN (shell and exec form,
//! `--network`), COPY/ADD from the context or an earlier stage (`--chown`,
//! `--chmod`, `--from`; ADD unpacks local tar archives), ENV, ARG, WORKDIR,
//! USER, ENTRYPOINT, CMD, LABEL, SHELL. Accepted and ignored (they describe
//! how a container is run, not what is in the image): EXPOSE, HEALTHCHECK,
//! STOPSIGNAL, MAINTAINER.

mod words;

pub use words::{expand, key_values, split_words};

use parse_dockerfile::{Command, Flag, Instruction, Source, UnescapedString};

use crate::error::{ImageError, Result};

/// A parsed Dockerfile.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    /// File name used in error messages.
    pub file: String,
    /// `ARG`s before the first `FROM` (usable in FROM lines): name, default.
    pub global_args: Vec<(String, Option<String>)>,
    /// Build stages in order; the last one is the image.
    pub stages: Vec<Stage>,
}

/// One `FROM ... [AS name]` and what follows it.
#[derive(Debug, Clone)]
pub struct Stage {
    /// `AS` name, if any.
    pub name: Option<String>,
    /// The base image reference, unexpanded (`scratch`, a reference, or an
    /// earlier stage's name).
    pub from: String,
    /// Line of the FROM.
    pub line: usize,
    /// The instructions after FROM.
    pub steps: Vec<Step>,
}

/// One instruction.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based line of the instruction.
    pub line: usize,
    /// The instruction's source text (part of its build-cache key).
    pub text: String,
    /// What it does.
    pub op: Op,
}

/// A command in shell form (run by the stage's SHELL) or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    /// `RUN echo hi`: run as `SHELL + [text]`.
    Shell(String),
    /// `RUN ["echo", "hi"]`: run as is.
    Exec(Vec<String>),
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum Op {
    /// Run a command; `network` is the `--network` flag's value.
    Run {
        command: CommandForm,
        network: Option<String>,
    },
    /// COPY (or ADD, which also unpacks local tar archives).
    Copy {
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
        from: Option<String>,
        add: bool,
    },
    /// ENV pairs (expanded in order).
    Env(Vec<(String, String)>),
    /// ARG name with an optional default.
    Arg(String, Option<String>),
    /// WORKDIR (relative paths join the current one).
    Workdir(String),
    /// USER.
    User(String),
    /// ENTRYPOINT.
    Entrypoint(CommandForm),
    /// CMD.
    Cmd(CommandForm),
    /// LABEL pairs.
    Label(Vec<(String, String)>),
    /// SHELL (the argv prefix of shell-form commands).
    Shell(Vec<String>),
    /// An instruction that does not change the image (EXPOSE, HEALTHCHECK, ...).
    Ignored(&'static str),
}

/// Parse a Dockerfile's text. `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Dockerfile> {
    let parsed = parse_dockerfile::parse(text).map_err(|e| ImageError::Build {
        file: file.to_string(),
        line: e.line().max(1),
        message: e.to_string(),
    })?;
    let mut out = Dockerfile {
        file: file.to_string(),
        global_args: Vec::new(),
        stages: Vec::new(),
    };
    for ins in &parsed.instructions {
        let start = instruction_start(ins);
        let line = line_of(text, start);
        let err = |message: String| ImageError::Build {
            file: file.to_string(),
            line,
            message,
        };
        if let Instruction::From(from) = ins {
            out.stages.push(Stage {
                name: from.as_.as_ref().map(|(_, n)| n.value.to_string()),
                from: from.image.value.to_string(),
                line,
                steps: Vec::new(),
            });
            if let Some(flag) = from.options.first() {
                return Err(err(format!("FROM {} is not supported", flag_text(flag))));
            }
            continue;
        }
        let op = convert(ins).map_err(err)?;
        match (out.stages.last_mut(), op) {
            (Some(stage), op) => stage.steps.push(Step {
                line,
                text: source_text(text, start),
                op,
            }),
            (None, Op::Arg(name, default)) => out.global_args.push((name, default)),
            (None, _) => return Err(err("only ARG may come before the first FROM".into())),
        }
    }
    if out.stages.is_empty() {
        return Err(ImageError::Build {
            file: file.to_string(),
            line: 1,
            message: "no FROM instruction".into(),
        });
    }
    Ok(out)
}

fn convert(ins: &Instruction) -> std::result::Result<Op, String> {
    Ok(match ins {
        Instruction::Run(run) => {
            if !run.here_docs.is_empty() {
                return Err("RUN with a here-document is not supported".into());
            }
            let mut network = None;
            for flag in &run.options {
                match flag.name.value.as_ref() {
                    "network" => network = flag.value.as_ref().map(|v| v.value.to_string()),
                    _ => return Err(format!("RUN {} is not supported", flag_text(flag))),
                }
            }
            Op::Run {
                command: command_form(&run.arguments),
                network,
            }
        }
        Instruction::Copy(c) => copy_op(&c.options, &c.src, &c.dest, false)?,
        Instruction::Add(a) => copy_op(&a.options, &a.src, &a.dest, true)?,
        Instruction::Env(e) => Op::Env(key_values(&e.arguments.value, true)?),
        Instruction::Label(l) => Op::Label(key_values(&l.arguments.value, true)?),
        Instruction::Arg(a) => {
            let text = a.arguments.value.trim();
            match text.split_once('=') {
                Some((k, v)) => Op::Arg(k.to_string(), Some(words::split_words(v)?.join(" "))),
                None => Op::Arg(text.to_string(), None),
            }
        }
        Instruction::Workdir(w) => Op::Workdir(w.arguments.value.trim().to_string()),
        Instruction::User(u) => Op::User(u.arguments.value.trim().to_string()),
        Instruction::Entrypoint(e) => Op::Entrypoint(command_form(&e.arguments)),
        Instruction::Cmd(c) => Op::Cmd(command_form(&c.arguments)),
        Instruction::Shell(s) => {
            Op::Shell(s.arguments.iter().map(|a| a.value.to_string()).collect())
        }
        Instruction::Expose(_) => Op::Ignored("EXPOSE"),
        Instruction::Healthcheck(_) => Op::Ignored("HEALTHCHECK"),
        Instruction::Stopsignal(_) => Op::Ignored("STOPSIGNAL"),
        Instruction::Maintainer(_) => Op::Ignored("MAINTAINER"),
        Instruction::Volume(_) => {
            return Err("VOLUME is not supported (sandboxes have no volumes)".into());
        }
        Instruction::Onbuild(_) => return Err("ONBUILD is not supported".into()),
        Instruction::From(_) => return Err("FROM handled by the caller".into()),
        _ => return Err("this instruction is not supported".into()),
    })
}

fn copy_op(
    options: &[Flag],
    src: &[Source],
    dest: &UnescapedString,
    add: bool,
) -> std::result::Result<Op, String> {
    let keyword = if add { "ADD" } else { "COPY" };
    let (mut chown, mut chmod, mut from) = (None, None, None);
    for flag in options {
        let value = flag.value.as_ref().map(|v| v.value.to_string());
        match flag.name.value.as_ref() {
            "chown" => chown = value,
            "chmod" => chmod = value,
            "from" if !add => from = value,
            "link" => {}
            _ => return Err(format!("{keyword} {} is not supported", flag_text(flag))),
        }
    }
    let mut sources = Vec::new();
    for s in src {
        match s {
            Source::Path(p) => sources.push(p.value.to_string()),
            _ => return Err(format!("{keyword} from a here-document is not supported")),
        }
    }
    Ok(Op::Copy {
        sources,
        dest: dest.value.to_string(),
        chown,
        chmod,
        from,
        add,
    })
}

fn command_form(cmd: &Command) -> CommandForm {
    match cmd {
        Command::Exec(args) => {
            CommandForm::Exec(args.value.iter().map(|a| a.value.to_string()).collect())
        }
        Command::Shell(s) => CommandForm::Shell(s.value.to_string()),
        // `Command` is non-exhaustive; a future form is passed as a shell line.
        _ => CommandForm::Shell(String::new()),
    }
}

fn flag_text(flag: &Flag) -> String {
    match &flag.value {
        Some(v) => format!("--{}={}", flag.name.value, v.value),
        None => format!("--{}", flag.name.value),
    }
}

/// Byte offset where an instruction's keyword starts.
fn instruction_start(ins: &Instruction) -> usize {
    match ins {
        Instruction::Add(i) => i.add.span.start,
        Instruction::Arg(i) => i.arg.span.start,
        Instruction::Cmd(i) => i.cmd.span.start,
        Instruction::Copy(i) => i.copy.span.start,
        Instruction::Entrypoint(i) => i.entrypoint.span.start,
        Instruction::Env(i) => i.env.span.start,
        Instruction::Expose(i) => i.expose.span.start,
        Instruction::From(i) => i.from.span.start,
        Instruction::Healthcheck(i) => i.healthcheck.span.start,
        Instruction::Label(i) => i.label.span.start,
        Instruction::Maintainer(i) => i.maintainer.span.start,
        Instruction::Onbuild(i) => i.onbuild.span.start,
        Instruction::Run(i) => i.run.span.start,
        Instruction::Shell(i) => i.shell.span.start,
        Instruction::Stopsignal(i) => i.stopsignal.span.start,
        Instruction::User(i) => i.user.span.start,
        Instruction::Volume(i) => i.volume.span.start,
        Instruction::Workdir(i) => i.workdir.span.start,
        _ => 0,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The instruction's logical line (continuations joined), for cache keys.
fn source_text(text: &str, start: usize) -> String {
    let mut out = String::new();
    for line in text[start..].lines() {
        let t = line.trim_end();
        match t.strip_suffix('\\') {
            Some(cont) => {
                out.push_str(cont);
                out.push(' ');
            }
            None => {
                out.push_str(t);
                break;
            }
        }
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests;
