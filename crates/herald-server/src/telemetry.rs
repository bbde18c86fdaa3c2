//! Logging: every line carries the instance id and hostname, as text (the default) or JSON
//! (`HERALD_LOG_FORMAT=json`), filtered by `RUST_LOG`.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber, writing to stderr. Later calls (as in tests) are no-ops.
pub fn init(format: LogFormat, instance: &str) {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let formatter = Lines {
        json: format == LogFormat::Json,
        instance: instance.to_owned(),
        host,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(formatter)
        .try_init();
}

struct Lines {
    json: bool,
    instance: String,
    host: String,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        if self.json {
            let mut fields = JsonFields(Map::new());
            event.record(&mut fields);
            let mut line = Map::new();
            line.insert("ts".into(), Value::from(time));
            line.insert("level".into(), Value::from(meta.level().as_str()));
            line.insert("target".into(), Value::from(meta.target()));
            line.insert("instance".into(), Value::from(self.instance.as_str()));
            line.insert("host".into(), Value::from(self.host.as_str()));
            line.extend(fields.0);
            return writeln!(writer, "{}", Value::Object(line));
        }
        write!(
            writer,
            "{time} {:>5} {}: instance={} host={} ",
            meta.level(),
            meta.target(),
            self.instance,
            self.host
        )?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}
