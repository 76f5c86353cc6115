//! Run inside a sandbox by the hardening tests: tries to drive the sandbox's
//! agent directly, as hostile code would. Prints what happened and exits 0
//! if the agent answered, 3 if it could not be used.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use bridle_proto::sandbox::v1 as pb;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/run/bridle/agent.sock".into());
    let answered = async {
        let mut agent = bridle_tests::client::connect(std::path::Path::new(&socket))?;
        let listed = agent
            .list_execs(pb::ListExecsRequest {})
            .await?
            .into_inner();
        anyhow::Ok(listed.execs.len())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), answered).await {
        Ok(Ok(n)) => {
            println!("agent answered: {n} execs");
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            println!("refused: {e:#}");
            std::process::ExitCode::from(3)
        }
        Err(_) => {
            println!("refused: no answer within 10 s");
            std::process::ExitCode::from(3)
        }
    }
}
