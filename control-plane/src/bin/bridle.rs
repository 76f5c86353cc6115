fn main() -> std::process::ExitCode {
    control_plane::cli::main()
}
