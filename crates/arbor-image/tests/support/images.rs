//! Real minimal OCI images for tests: a base layer holding Debian's static
//! busybox (`/bin/busybox` plus applet symlinks, a tiny `/etc/passwd`), small
//! file layers on top, configs with Env/WorkingDir/User/Cmd, and a multi-arch
//! image index, pushed to a [`TestRegistry`] with oci-client.

use std::io::Write;
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageIndex, Platform,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

use super::{TEST_PASSWORD, TEST_USER, TestRegistry, require_tool};

/// Media type of the gzip layers pushed here.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of the configs pushed here.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Busybox applets linked into `/bin` of the base layer.
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "env", "id", "pwd", "true", "false", "mkdir", "rm", "cp", "mv",
    "sleep", "test", "grep", "sed", "wc", "head", "touch", "chmod", "ln", "stat", "uname",
    "whoami", "printf",
];

/// One entry of a layer tar.
pub enum Entry<'a> {
    /// A directory with a mode.
    Dir(&'a str, u32),
    /// A regular file with contents and a mode.
    File(&'a str, &'a [u8], u32),
    /// A symlink and its target.
    Symlink(&'a str, &'a str),
}

/// A layer: the tar, its gzip blob and both digests.
#[derive(Clone)]
pub struct Layer {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// The gzip blob pushed to the registry.
    pub gz: Vec<u8>,
    /// `sha256:` of `gz` (the blob digest in the manifest).
    pub digest: String,
    /// `sha256:` of `tar` (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
}

impl Layer {
    /// A layer of `entries`, owned by root, mtime 0.
    pub fn new(entries: &[Entry]) -> Layer {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match entry {
                Entry::Dir(path, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    builder.append_data(&mut h, path, &[][..]).expect("tar dir");
                }
                Entry::File(path, data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    builder.append_data(&mut h, path, *data).expect("tar file");
                }
                Entry::Symlink(path, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    builder.append_link(&mut h, path, target).expect("tar link");
                }
            }
        }
        let tar = builder.into_inner().expect("finish tar");
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        let gz = gz.finish().expect("gzip finish");
        Layer {
            digest: sha256(&gz),
            diff_id: sha256(&tar),
            tar,
            gz,
        }
    }

    /// A layer of regular files (mode 0644) under existing directories.
    pub fn files(files: &[(&str, &[u8])]) -> Layer {
        let entries: Vec<Entry> = files
            .iter()
            .map(|(path, data)| Entry::File(path, data, 0o644))
            .collect();
        Layer::new(&entries)
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The busybox base layer (built once per test binary).
pub fn busybox_layer() -> &'static Layer {
    static BASE: OnceLock<Layer> = OnceLock::new();
    BASE.get_or_init(|| {
        require_tool("busybox", "busybox-static");
        let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
        let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
        let group = b"root:x:0:\napp:x:1000:\n";
        let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
        let mut entries = vec![
            Entry::Dir("bin", 0o755),
            Entry::Dir("etc", 0o755),
            Entry::Dir("tmp", 0o1777),
            Entry::Dir("root", 0o700),
            Entry::Dir("home", 0o755),
            Entry::Dir("home/app", 0o755),
            Entry::Dir("proc", 0o555),
            Entry::Dir("dev", 0o755),
            Entry::Dir("sys", 0o555),
            Entry::File("bin/busybox", &busybox, 0o755),
            Entry::File("etc/passwd", passwd, 0o644),
            Entry::File("etc/group", group, 0o644),
        ];
        entries.extend(links.iter().map(|l| Entry::Symlink(l, "busybox")));
        Layer::new(&entries)
    })
}

/// The runtime config of a pushed image.
#[derive(Clone)]
pub struct ImageSpec {
    /// `Env`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `architecture` (GOARCH name).
    pub architecture: String,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            env: vec!["PATH=/bin".into()],
            working_dir: "/".into(),
            user: String::new(),
            cmd: vec!["/bin/sh".into()],
            architecture: host_arch().into(),
        }
    }
}

/// The host's GOARCH name (what an image index calls this machine).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The config blob of an image of `layers`.
pub fn config_json(spec: &ImageSpec, layers: &[&Layer]) -> Vec<u8> {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": spec.architecture,
        "os": "linux",
        "config": {
            "Env": spec.env,
            "WorkingDir": spec.working_dir,
            "User": spec.user,
            "Cmd": spec.cmd,
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [],
    }))
    .expect("config json")
}

/// What a push left in the registry.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Size of the manifest in bytes.
    pub manifest_size: i64,
    /// Digest of the config blob.
    pub config_digest: String,
    /// `architecture` of the config.
    pub architecture: String,
}

/// A client that pushes to `reg` over plain HTTP, and the auth it needs.
pub fn push_client(reg: &TestRegistry) -> (Client, RegistryAuth) {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let auth = if reg.auth {
        RegistryAuth::Basic(TEST_USER.into(), TEST_PASSWORD.into())
    } else {
        RegistryAuth::Anonymous
    };
    (client, auth)
}

/// Push an image of `layers` (bottom first) as `<repo>:<tag>`.
pub async fn push_image(
    reg: &TestRegistry,
    repo: &str,
    tag: &str,
    layers: &[&Layer],
    spec: &ImageSpec,
) -> Pushed {
    let (client, auth) = push_client(reg);
    let reference: Reference = reg.reference(repo, tag).parse().expect("reference");
    let image_layers: Vec<ImageLayer> = layers
        .iter()
        .map(|l| ImageLayer::new(l.gz.clone(), LAYER_MEDIA_TYPE.into(), None))
        .collect();
    let config_blob = config_json(spec, layers);
    let config_digest = sha256(&config_blob);
    let config = Config::new(config_blob, CONFIG_MEDIA_TYPE.into(), None);
    client
        .push(&reference, &image_layers, config, &auth, None)
        .await
        .unwrap_or_else(|e| panic!("push {reference}: {e}; registry log:\n{}", reg.log()));
    let (body, manifest_digest) = client
        .pull_manifest_raw(&reference, &auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .expect("read back pushed manifest");
    Pushed {
        manifest_digest,
        manifest_size: body.len() as i64,
        config_digest,
        architecture: spec.architecture.clone(),
    }
}

/// Push an image index over `images` (in this order) as `<repo>:<tag>`.
pub async fn push_index(reg: &TestRegistry, repo: &str, tag: &str, images: &[Pushed]) -> String {
    let (client, auth) = push_client(reg);
    let reference: Reference = reg.reference(repo, tag).parse().expect("reference");
    let manifests = images
        .iter()
        .map(|p| ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: p.manifest_digest.clone(),
            size: p.manifest_size,
            platform: Some(Platform {
                architecture: p.architecture.clone(),
                os: "linux".into(),
                os_version: None,
                os_features: None,
                variant: (p.architecture == "arm64").then(|| "v8".into()),
                features: None,
            }),
            annotations: None,
        })
        .collect();
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
        manifests,
        artifact_type: None,
        annotations: None,
    };
    client
        .push_manifest_list(&reference, &auth, index)
        .await
        .unwrap_or_else(|e| panic!("push index {reference}: {e}; registry log:\n{}", reg.log()));
    let (_, digest) = client
        .pull_manifest_raw(&reference, &auth, &[OCI_IMAGE_INDEX_MEDIA_TYPE])
        .await
        .expect("read back pushed index");
    digest
}
