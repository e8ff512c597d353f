use super::*;

const FILE: &str = "\
ARG BASE=busybox
FROM ${BASE} AS base
# a comment
ENV A=1 B=\"two words\"
RUN echo hi \\
    && echo there
RUN [\"/bin/sh\", \"-c\", \"true\"]
COPY --chown=app:app src/ /app/
WORKDIR /app
USER app
EXPOSE 80
CMD [\"sh\"]
FROM base
COPY --from=base /app /copy
";

#[test]
fn parses_stages_steps_and_lines() {
    let df = parse(FILE, "Dockerfile").unwrap();
    assert_eq!(
        df.global_args,
        vec![("BASE".into(), Some("busybox".into()))]
    );
    assert_eq!(df.stages.len(), 2);
    let s = &df.stages[0];
    assert_eq!(
        (s.name.as_deref(), s.from.as_str(), s.line),
        (Some("base"), "${BASE}", 2)
    );
    assert_eq!(s.steps[0].line, 4);
    let run = &s.steps[1];
    assert_eq!(run.line, 5);
    assert_eq!(run.text, "RUN echo hi      && echo there");
    match &run.op {
        Op::Run {
            command: CommandForm::Shell(sh),
            network: None,
        } => {
            assert!(sh.contains("echo there"))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&s.steps[2].op, Op::Run { command: CommandForm::Exec(a), .. } if a.len() == 3)
    );
    match &s.steps[3].op {
        Op::Copy {
            sources,
            dest,
            chown,
            add: false,
            ..
        } => {
            assert_eq!(
                (sources.as_slice(), dest.as_str()),
                (&["src/".to_string()][..], "/app/")
            );
            assert_eq!(chown.as_deref(), Some("app:app"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.steps[6].op, Op::Ignored("EXPOSE")));
    assert!(matches!(&df.stages[1].steps[0].op, Op::Copy { from: Some(f), .. } if f == "base"));
}

#[test]
fn unsupported_instructions_name_file_and_line() {
    let e = parse("FROM busybox\nRUN true\nVOLUME /data\n", "task/Dockerfile").unwrap_err();
    assert_eq!(
        e.to_string(),
        "task/Dockerfile:3: VOLUME is not supported (sandboxes have no volumes)"
    );
    let e = parse("FROM busybox\nRUN --mount=type=cache,target=/x true\n", "D").unwrap_err();
    assert!(e.to_string().starts_with("D:2: RUN --mount="), "{e}");
    let e = parse("RUN true\n", "D").unwrap_err();
    assert!(e.to_string().contains("D:1:"), "{e}");
    let e = parse("# nothing\n", "D").unwrap_err();
    assert!(
        e.to_string().starts_with("D:1:") && e.to_string().contains("FROM"),
        "{e}"
    );
}
