//! Gateway benchmark: prints one JSON object (see `arbor_gateway::bench`).
//!
//! `cargo run --release -p arbor-gateway --example bench -- --sessions 1000 --calls 10`

use arbor_gateway::bench::{BenchOptions, bench};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut opts = BenchOptions::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = || {
            args.get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{} needs a value", args[i]))
        };
        match args[i].as_str() {
            "--sessions" => opts.sessions = val()?.parse()?,
            "--calls" => opts.calls = val()?.parse()?,
            "--reply-tokens" => opts.reply_tokens = val()?.parse()?,
            "--chunk-delay-ms" => {
                opts.chunk_delay = std::time::Duration::from_millis(val()?.parse()?)
            }
            "--latency-samples" => opts.latency_samples = val()?.parse()?,
            "--store" => opts.store = Some(val()?.into()),
            "--json" => {
                i += 1;
                continue;
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
        i += 2;
    }
    let report = bench(opts).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
