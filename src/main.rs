fn main() -> std::process::ExitCode {
    lumenflow_agent::run::cli_main(Vec::new())
}
