//! `lambda-speed`: the speed layer (Kinesis / JSON-lines consumer writing 5-minute tiles). Not built yet: it says so and exits non-zero.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "lambda-speed: the speed layer (Kinesis / JSON-lines consumer writing 5-minute tiles).\n\nNot built yet: this binary exists so the workspace has its final shape.\nIt will derive everything from a feature definition such as examples/fraud/features.toml\n(validate one today with `lambda-batch check --view <file>`)."
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "lambda-speed: not built yet (the speed layer (Kinesis / JSON-lines consumer writing 5-minute tiles)); nothing was run"
    );
    ExitCode::from(2)
}
