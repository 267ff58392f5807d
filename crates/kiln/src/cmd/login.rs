//! `kiln login` and `kiln logout`: store or remove registry credentials in Docker's
//! `config.json` (or its credential helper), so that docker, podman, skopeo and kiln share them.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use anyhow::Context as _;
use kiln_oci::{ClientConfig, Credential, DockerConfig, RegistryClient};

use crate::Globals;

/// Arguments of `kiln login`.
#[derive(clap::Args)]
pub struct LoginArgs {
    /// Registry host, e.g. ghcr.io or 127.0.0.1:5000 (default: docker.io)
    #[arg(value_name = "SERVER")]
    server: Option<String>,
    /// User name
    #[arg(short, long)]
    username: Option<String>,
    /// Password or token (prefer --password-stdin: a flag shows in the process list)
    #[arg(short, long)]
    password: Option<String>,
    /// Read the password or token from standard input
    #[arg(long)]
    password_stdin: bool,
    /// Store the credentials without checking them against the registry first
    #[arg(long)]
    no_verify: bool,
    /// Speak plain HTTP to this registry (always done for localhost and 127.0.0.0/8)
    #[arg(long)]
    insecure: bool,
}

/// Arguments of `kiln logout`.
#[derive(clap::Args)]
pub struct LogoutArgs {
    /// Registry host (default: docker.io)
    #[arg(value_name = "SERVER")]
    server: Option<String>,
}

fn server_name(server: Option<String>) -> String {
    kiln_oci::reference::normalize_registry(server.as_deref().unwrap_or("docker.io"))
}

/// Runs `kiln login`.
pub fn run_login(args: LoginArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let server = server_name(args.server);
    let Some(username) = args.username.filter(|u| !u.is_empty()) else {
        anyhow::bail!("kiln login {server}: give the user name with --username USER");
    };
    let password = match (args.password, args.password_stdin) {
        (Some(_), true) => anyhow::bail!("--password and --password-stdin are exclusive"),
        (Some(p), false) => {
            eprintln!("WARNING! Using --password on the command line is insecure; use --password-stdin.");
            p
        }
        (None, true) => {
            let mut p = String::new();
            std::io::stdin().read_to_string(&mut p).context("reading the password from standard input")?;
            p.trim_end_matches(['\n', '\r']).to_owned()
        }
        (None, false) if !std::io::stdin().is_terminal() => {
            anyhow::bail!("kiln login {server}: pass the password with --password-stdin")
        }
        (None, false) => anyhow::bail!(
            "kiln login {server}: kiln does not prompt; pipe the password: `echo \"$TOKEN\" | kiln login -u {username} --password-stdin {server}`"
        ),
    };
    if password.is_empty() {
        anyhow::bail!("kiln login {server}: the password is empty");
    }
    let docker_config = DockerConfig::from_env();
    if !args.no_verify {
        let mut config = ClientConfig {
            docker_config: docker_config.clone(),
            ..ClientConfig::default()
        };
        config.credentials.insert(
            server.clone(),
            Credential::Basic {
                username: username.clone(),
                password: password.clone(),
            },
        );
        if args.insecure {
            config.hosts.entry(server.clone()).or_default().insecure = true;
        }
        let client = RegistryClient::new(config)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(client.ping(&server))
            .with_context(|| format!("logging in to {server}"))?;
    }
    docker_config
        .store(&server, &username, &password)
        .with_context(|| format!("storing credentials for {server}"))?;
    outln!(
        "Login Succeeded ({server}, credentials in {})",
        docker_config.path().display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `kiln logout`.
pub fn run_logout(args: LogoutArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let server = server_name(args.server);
    let docker_config = DockerConfig::from_env();
    if docker_config.erase(&server)? {
        outln!("Removed login credentials for {server}");
    } else {
        outln!("Not logged in to {server}");
    }
    Ok(ExitCode::SUCCESS)
}
