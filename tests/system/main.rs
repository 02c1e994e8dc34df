//! The appliance as the operating system sees it: `scripts/install.sh` into a staging tree, the
//! `.deb` installed and removed with dpkg (root), and the systemd units (`systemd-analyze`
//! rating and verify, the directives the daemon relies on, Exec lines the binary accepts, and
//! as root a real boot of both units under `systemd-nspawn`). They use fixed names (the
//! `modelgate` package, a cached debootstrap root), so run them one `cargo test --test system`
//! at a time.

mod harness;

mod packaging;
mod systemd;
