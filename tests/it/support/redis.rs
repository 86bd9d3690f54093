//! A `redis-server` of a test's own (Debian's), for `limits.store`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{closed_port, debian_command, KillOnDrop};

/// A `redis-server` of this test's own, on a loopback port; stopped when dropped.
pub struct Redis {
    port: u16,
    server: Option<KillOnDrop>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = closed_port().port();
        let mut redis = Redis { port, server: None };
        redis.restart();
        redis
    }

    /// Starts the server on its port (again), and waits until it answers.
    pub fn restart(&mut self) {
        let server = Command::new(debian_command("redis-server", "redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(KillOnDrop(server));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.connection().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL): what an outage looks like to the gateway.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.0.kill();
            let _ = server.0.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_millis(200))?;
        redis::cmd("PING").query::<String>(&mut conn)?;
        Ok(conn)
    }

    /// Every key in the store, with its value as text (members and scores of sorted sets,
    /// fields and values of hashes);
    /// those that expire while it reads are left out.
    pub fn dump(&self) -> Vec<(String, String)> {
        let mut conn = self.connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        keys.into_iter()
            .filter_map(|key| {
                let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
                let value = match kind.as_str() {
                    "zset" => {
                        let members: Vec<String> = redis::cmd("ZRANGE")
                            .arg(&key)
                            .arg(0)
                            .arg(-1)
                            .arg("WITHSCORES")
                            .query(&mut conn)
                            .unwrap();
                        members.join(" ")
                    }
                    "hash" => {
                        let fields: Vec<String> =
                            redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
                        fields.join(" ")
                    }
                    // None: it expired after KEYS listed it.
                    "string" => redis::cmd("GET")
                        .arg(&key)
                        .query::<Option<String>>(&mut conn)
                        .unwrap()?,
                    "none" => return None,
                    other => panic!("the gateway wrote a {other} at {key}"),
                };
                Some((key, value))
            })
            .collect()
    }
}
