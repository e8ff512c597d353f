//! Image mode of the SWE-bench adapter: every instance runs in its own
//! prebuilt image (SWE-bench's `sweb.eval.<arch>.<instance>` images), whose
//! `/testbed` already holds the repository at `base_commit` with its
//! environment installed, so no mirror checkout and no install runs.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TaskError};

/// Registry of SWE-bench's published images.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Repository prefix of SWE-bench's instance images (x86_64).
pub const DEFAULT_PREFIX: &str = "swebench/sweb.eval.x86_64.";
/// Tag of SWE-bench's instance images.
pub const DEFAULT_TAG: &str = "latest";
/// How SWE-bench's eval scripts enter the `testbed` conda environment. The
/// two steps work under any POSIX `sh` (dash does not pass arguments to a
/// sourced script, so `activate testbed` in one step would enter `base`).
pub const DEFAULT_ACTIVATE: &str = ". /opt/miniconda3/bin/activate && conda activate testbed";

/// The `[images]` table of a SWE-bench config: where instance images come
/// from and how their environment is entered before the tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweImages {
    /// Registry host (`docker.io`, `127.0.0.1:5000`, a mirror...); empty:
    /// the reference names none and the image backend's default applies.
    pub registry: String,
    /// Repository prefix the instance id is appended to.
    pub prefix: String,
    /// Image tag.
    pub tag: String,
    /// Shell run before the eval commands, in the same shell (`""`: none).
    pub activate: String,
}

impl Default for SweImages {
    fn default() -> Self {
        SweImages {
            registry: DEFAULT_REGISTRY.into(),
            prefix: DEFAULT_PREFIX.into(),
            tag: DEFAULT_TAG.into(),
            activate: DEFAULT_ACTIVATE.into(),
        }
    }
}

impl SweImages {
    /// The image of one instance, as SWE-bench's harness names it:
    /// `{registry}/{prefix}{instance_id}:{tag}`, the repository lower-cased
    /// and every `__` in it replaced by `_1776_` (Docker repository names
    /// allow neither upper case nor a double underscore).
    pub fn image_name(&self, instance_id: &str) -> String {
        let repository = format!("{}{}", self.prefix, instance_id)
            .to_lowercase()
            .replace("__", "_1776_");
        let registry = self.registry.trim_end_matches('/');
        if registry.is_empty() {
            format!("{repository}:{}", self.tag)
        } else {
            format!("{registry}/{repository}:{}", self.tag)
        }
    }

    /// [`Self::image_name`], refused (naming `file`) when it is not a
    /// valid image reference, so a bad prefix or id fails at load time
    /// rather than at the first pull.
    pub fn checked_image_name(&self, instance_id: &str, file: &str) -> Result<String> {
        if self.tag.is_empty() || !tag_re().is_match(&self.tag) {
            return Err(TaskError::invalid(
                file,
                "images.tag",
                format!("{:?} is not a valid image tag", self.tag),
            ));
        }
        if self.registry.chars().any(|c| c.is_whitespace() || c == '@') {
            return Err(TaskError::invalid(
                file,
                "images.registry",
                format!("{:?} is not a registry host", self.registry),
            ));
        }
        let name = self.image_name(instance_id);
        let repository = name
            .strip_suffix(&format!(":{}", self.tag))
            .unwrap_or(&name);
        let repository = match self.registry.trim_end_matches('/') {
            "" => repository,
            r => repository
                .strip_prefix(&format!("{r}/"))
                .unwrap_or(repository),
        };
        if !repository.split('/').all(|c| component_re().is_match(c)) {
            return Err(TaskError::invalid(
                file,
                "instance_id",
                format!(
                    "image repository {repository:?} (prefix {:?} + instance id) is not a \
                     valid image name",
                    self.prefix
                ),
            ));
        }
        Ok(name)
    }

    /// The setup script of an instance: tag the image's state as
    /// `arbor-base` so grading can restore the test files from it (when the
    /// image has git; the restore commands tolerate its absence).
    pub fn setup_script(&self) -> String {
        "if command -v git >/dev/null 2>&1; then\n  \
         git config --global --add safe.directory \"$PWD\" 2>/dev/null || true\n  \
         git tag -f arbor-base >/dev/null 2>&1 || true\nfi\n"
            .to_string()
    }
}

/// A path component of a repository name (OCI distribution spec).
fn component_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$").expect("component regex")
    })
}

/// A tag (OCI distribution spec).
fn tag_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$").expect("tag regex"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_harness() {
        let images = SweImages::default();
        assert_eq!(
            images.image_name("astropy__astropy-12907"),
            "docker.io/swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
        );
        assert_eq!(
            images.image_name("Django__Django-11099"),
            "docker.io/swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
        );
        let local = SweImages {
            registry: "127.0.0.1:5000/".into(),
            tag: "v2".into(),
            ..SweImages::default()
        };
        assert_eq!(
            local.checked_image_name("sympy__sympy-20590", "f").unwrap(),
            "127.0.0.1:5000/swebench/sweb.eval.x86_64.sympy_1776_sympy-20590:v2"
        );
        let bare = SweImages {
            registry: String::new(),
            ..SweImages::default()
        };
        assert_eq!(
            bare.image_name("a__b-1"),
            "swebench/sweb.eval.x86_64.a_1776_b-1:latest"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let images = SweImages::default();
        let e = images.checked_image_name("bad id with spaces", "x.jsonl:2");
        assert!(
            matches!(e, Err(TaskError::Invalid { ref field, ref file, .. })
                if field == "instance_id" && file == "x.jsonl:2"),
            "{e:?}"
        );
        let no_tag = SweImages {
            tag: String::new(),
            ..SweImages::default()
        };
        let e = no_tag.checked_image_name("a__b-1", "f");
        assert!(
            matches!(e, Err(TaskError::Invalid { ref field, .. }) if field == "images.tag"),
            "{e:?}"
        );
    }
}

#[cfg(test)]
mod mapping_tests {
    use serde_json::json;

    use super::super::{SweBenchConfig, SweInstance, instance_to_task};
    use crate::error::TaskError;
    use crate::verify::VerifierSpec;

    fn instance() -> SweInstance {
        serde_json::from_value(json!({
            "instance_id": "Acme__calc-7", "repo": "acme/calc", "base_commit": "abc123",
            "patch": "diff --git a/calc.sh b/calc.sh\n", "problem_statement": "add subtracts",
            "test_patch": "diff --git a/tests/t.sh b/tests/t.sh\n--- a/tests/t.sh\n+++ b/tests/t.sh\n",
            "version": "1.0", "FAIL_TO_PASS": "[\"tests/t.sh::test_add\"]", "PASS_TO_PASS": "[]",
        }))
        .unwrap()
    }

    fn config(toml_text: &str) -> SweBenchConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swebench.toml");
        std::fs::write(&path, toml_text).unwrap();
        SweBenchConfig::load(&path).unwrap()
    }

    #[test]
    fn image_mode_runs_in_the_instance_image() {
        let cfg = config(
            "[images]\nregistry = \"127.0.0.1:5000\"\n\n[specs.\"acme/calc\".\"*\"]\n\
             install = \"pip install -e .\"\ntest_cmd = \"pytest -rA\"\neval_commands = [\"export X=1\"]\n",
        );
        let task = instance_to_task(&instance(), &cfg, "i.jsonl:1").unwrap();
        let env = &task.environment;
        assert_eq!(
            env.image.as_deref(),
            Some("127.0.0.1:5000/swebench/sweb.eval.x86_64.acme_1776_calc-7:latest")
        );
        assert!(env.git.is_none() && env.rootfs.is_none());
        let setup = env.setup.as_deref().unwrap();
        assert!(setup.contains("git tag -f arbor-base") && !setup.contains("pip"));
        let VerifierSpec::TestSuite(suite) = &task.verifier else {
            panic!("a test suite verifier");
        };
        assert_eq!(
            suite.command,
            ". /opt/miniconda3/bin/activate && conda activate testbed && export X=1 && \
             pytest -rA 'tests/t.sh'"
        );
        assert!(suite.pre_command.as_deref().unwrap().contains("arbor-base"));
    }

    #[test]
    fn spec_image_wins_and_empty_activate_adds_nothing() {
        let cfg = config(
            "[images]\nactivate = \"\"\n\n[specs.\"acme/calc\".\"1.0\"]\n\
             image = \"mirror.local/calc:1\"\ntest_cmd = \"sh run.sh\"\n",
        );
        let task = instance_to_task(&instance(), &cfg, "i.jsonl:1").unwrap();
        assert_eq!(
            task.environment.image.as_deref(),
            Some("mirror.local/calc:1")
        );
        let VerifierSpec::TestSuite(suite) = &task.verifier else {
            panic!("a test suite verifier");
        };
        assert_eq!(suite.command, "sh run.sh 'tests/t.sh'");
    }

    #[test]
    fn without_images_a_mirror_is_required() {
        let cfg = config("[specs.\"acme/calc\".\"*\"]\ntest_cmd = \"pytest\"\n");
        let e = instance_to_task(&instance(), &cfg, "i.jsonl:1");
        assert!(
            matches!(e, Err(TaskError::Invalid { ref field, ref message, .. })
                if field == "repo" && message.contains("[images]")),
            "{e:?}"
        );
        let bad = "[images]\nregistry = \"docker.io\"\ntypo = 1\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swebench.toml");
        std::fs::write(&path, bad).unwrap();
        let e = SweBenchConfig::load(&path);
        assert!(
            matches!(e, Err(TaskError::Invalid { ref field, .. }) if field.contains("images")),
            "{e:?}"
        );
    }
}
