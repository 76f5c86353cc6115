fn main() -> std::process::ExitCode {
    bridle_cli::main()
}
