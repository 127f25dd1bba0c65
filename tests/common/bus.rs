//! A private dbus-daemon for the D-Bus tests: a session bus, or one with the system bus's
//! default policy plus llmsd's policy file.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::repo_root;

/// A dbus-daemon of our own, listening in a temporary directory.
pub struct PrivateBus {
    child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl PrivateBus {
    /// A session bus (everything allowed, only our uid may connect).
    pub fn session() -> Self {
        Self::launch(|listen, _| vec!["--session".into(), format!("--address={listen}")])
    }

    /// A bus with the system bus's default policy (deny owning names and calling methods;
    /// any user may connect) plus llmsd's policy file.
    pub fn system() -> Self {
        let policy = repo_root().join("systemd/org.llmsd.Llm1.conf");
        Self::launch(|listen, dir| {
            let config = format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
                policy = policy.display()
            );
            let path = dir.join("system.conf");
            std::fs::write(&path, config).expect("bus config");
            vec![format!("--config-file={}", path.display())]
        })
    }

    fn launch(args: impl FnOnce(&str, &Path) -> Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Other uids (setpriv) reach the socket inside.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let listen = format!("unix:path={}", dir.path().join("bus").display());
        let mut child = Command::new("dbus-daemon")
            .args(["--nofork", "--nopidfile", "--print-address"])
            .args(args(&listen, dir.path()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon runs (install dbus)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("dbus-daemon prints its address");
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:path="), "address {address:?}");
        PrivateBus {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
