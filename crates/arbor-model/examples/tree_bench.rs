//! Prints the one JSON object of the linear-vs-tree training benchmark (progress on stderr).
//!
//! `cargo run --release -p arbor-model --example tree_bench [-- --quick]`

fn main() -> anyhow::Result<()> {
    let mut opts = arbor_model::bench::TreeBenchOptions::default();
    if std::env::args().any(|a| a == "--quick") {
        opts.pors = vec![0.5, 0.85];
        opts.shapes = vec![arbor_model::bench::BenchShape::GroupSampling];
        opts.unique_tokens = 512;
        opts.path_len = 128;
        opts.steps = 1;
        opts.model = arbor_model::Qwen3Config::tiny(512, 64, 2, 4, 2);
    }
    let v = arbor_model::bench::tree_bench(opts)?;
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
