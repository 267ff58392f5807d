//! Writes reports and traces of synthetic records (the examples/ build and a 300-step one) to
//! a directory, for looking at the report without a real build:
//! `cargo run -p kiln-history --example synthetic_report -- OUT_DIR`.

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> std::io::Result<()> {
    let out = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "report-out".into()),
    );
    std::fs::create_dir_all(&out)?;
    let records = [
        ("example-cold", common::example_cold()),
        (
            "example-edit",
            common::example_rebuild("0199aa0000000002", "sha256:bbb222controller", "1.0.0"),
        ),
        (
            "large-300",
            common::large_build("0199ab0000000001", 300, true),
        ),
    ];
    for (name, record) in &records {
        std::fs::write(
            out.join(format!("{name}.html")),
            kiln_history::render_report(record),
        )?;
        let trace = serde_json::to_vec(&kiln_history::chrome_trace(record))
            .map_err(std::io::Error::other)?;
        std::fs::write(out.join(format!("{name}.trace.json")), trace)?;
        std::fs::write(
            out.join(format!("{name}.record.json")),
            serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?,
        )?;
    }
    println!("wrote {}", out.display());
    Ok(())
}
