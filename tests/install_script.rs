//! Runs `scripts/test-install.sh` against the built binary: `deploy/install.sh` in a scratch
//! root with a fake `systemctl` (fresh machine without keys, keys added, upgrade, upgrade
//! refused on a failing check, `--check`, no cargo). Nothing is installed on this machine.

use std::process::Command;

#[test]
fn install_script_scenarios() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{repo}/scripts/test-install.sh"))
        .arg(env!("CARGO_BIN_EXE_sifucall"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
