CREATE TABLE app (
	id VARCHAR NOT NULL, 
	name VARCHAR NOT NULL, 
	state VARCHAR NOT NULL, 
	ephemeral BOOLEAN NOT NULL, 
	created_at FLOAT NOT NULL, 
	stopped_at FLOAT, 
	client_heartbeat_at FLOAT, 
	version INTEGER NOT NULL, 
	description VARCHAR NOT NULL, 
	tags JSON, 
	budget JSON, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_app_name ON app (name);
-- default app.state = 'running'
-- default app.ephemeral = True
-- default app.created_at = 0.0
-- default app.version = 1
-- default app.description = ''
CREATE TABLE call (
	id VARCHAR NOT NULL, 
	function_id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	kind VARCHAR NOT NULL, 
	created_at FLOAT NOT NULL, 
	num_inputs INTEGER NOT NULL, 
	cancelled BOOLEAN NOT NULL, 
	created_by VARCHAR, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_call_app_id ON call (app_id);
CREATE INDEX ix_call_function_id ON call (function_id);
-- default call.kind = 'remote'
-- default call.created_at = 0.0
-- default call.num_inputs = 0
-- default call.cancelled = False
CREATE TABLE deployment (
	id INTEGER NOT NULL, 
	app_id VARCHAR NOT NULL, 
	version INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	functions JSON, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_deployment_app_id ON deployment (app_id);
-- default deployment.version = 1
-- default deployment.created_at = 0.0
CREATE TABLE event (
	id INTEGER NOT NULL, 
	app_id VARCHAR, 
	function_id VARCHAR, 
	ts FLOAT NOT NULL, 
	kind VARCHAR NOT NULL, 
	message VARCHAR NOT NULL, 
	data JSON, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_event_app ON event (app_id, id);
-- default event.ts = 0.0
-- default event.kind = ''
-- default event.message = ''
CREATE TABLE function (
	id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	name VARCHAR NOT NULL, 
	parent_id VARCHAR, 
	spec JSON, 
	module VARCHAR NOT NULL, 
	source_name VARCHAR, 
	source_blob VARCHAR, 
	source_dir VARCHAR, 
	pickled_blob VARCHAR, 
	inline_env JSON, 
	definition_hash VARCHAR NOT NULL, 
	version INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	last_active_at FLOAT NOT NULL, 
	state VARCHAR NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_function_app_id ON function (app_id);
-- default function.module = ''
-- default function.definition_hash = ''
-- default function.version = 1
-- default function.created_at = 0.0
-- default function.last_active_at = 0.0
-- default function.state = 'active'
CREATE TABLE input (
	id INTEGER NOT NULL, 
	call_id VARCHAR NOT NULL, 
	function_id VARCHAR NOT NULL, 
	idx INTEGER NOT NULL, 
	method VARCHAR, 
	args BLOB, 
	args_blob VARCHAR, 
	state INTEGER NOT NULL, 
	attempts INTEGER NOT NULL, 
	crashes INTEGER NOT NULL, 
	worker_id VARCHAR, 
	lease_expires FLOAT NOT NULL, 
	available_at FLOAT NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (call_id, idx)
);
CREATE INDEX ix_input_call ON input (call_id, state);
CREATE INDEX ix_input_open ON input (function_id, state) WHERE state < 2;
CREATE INDEX ix_input_pending ON input (function_id, id) WHERE state = 0;
CREATE INDEX ix_input_worker ON input (worker_id, state);
-- default input.state = 0
-- default input.attempts = 0
-- default input.crashes = 0
-- default input.lease_expires = 0.0
-- default input.available_at = 0.0
-- default input.created_at = 0.0
CREATE TABLE kv_dict (
	id VARCHAR NOT NULL, 
	name VARCHAR, 
	ephemeral BOOLEAN NOT NULL, 
	created_at FLOAT NOT NULL, 
	created_by VARCHAR NOT NULL, 
	last_used_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
-- default kv_dict.ephemeral = False
-- default kv_dict.created_at = 0.0
-- default kv_dict.created_by = ''
-- default kv_dict.last_used_at = 0.0
CREATE TABLE kv_dict_entry (
	dict_id VARCHAR NOT NULL, 
	key_hash BLOB NOT NULL, 
	"key" BLOB NOT NULL, 
	value BLOB NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (dict_id, key_hash)
);
CREATE INDEX ix_kv_dict_entry_updated ON kv_dict_entry (updated_at);
-- default kv_dict_entry.updated_at = 0.0
CREATE TABLE kv_queue (
	id VARCHAR NOT NULL, 
	name VARCHAR, 
	ephemeral BOOLEAN NOT NULL, 
	created_at FLOAT NOT NULL, 
	created_by VARCHAR NOT NULL, 
	last_used_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
-- default kv_queue.ephemeral = False
-- default kv_queue.created_at = 0.0
-- default kv_queue.created_by = ''
-- default kv_queue.last_used_at = 0.0
CREATE TABLE kv_queue_item (
	id INTEGER NOT NULL, 
	queue_id VARCHAR NOT NULL, 
	partition VARCHAR NOT NULL, 
	value BLOB NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_kv_queue_item_order ON kv_queue_item (queue_id, partition, id);
-- default kv_queue_item.partition = ''
-- default kv_queue_item.created_at = 0.0
CREATE TABLE kv_queue_partition (
	queue_id VARCHAR NOT NULL, 
	partition VARCHAR NOT NULL, 
	expires_at FLOAT NOT NULL, 
	items INTEGER NOT NULL, 
	bytes INTEGER NOT NULL, 
	PRIMARY KEY (queue_id, partition)
);
CREATE INDEX ix_kv_queue_partition_expires ON kv_queue_partition (expires_at);
-- default kv_queue_partition.expires_at = 0.0
-- default kv_queue_partition.items = 0
-- default kv_queue_partition.bytes = 0
CREATE TABLE kv_request (
	object_id VARCHAR NOT NULL, 
	request_id VARCHAR NOT NULL, 
	op VARCHAR NOT NULL, 
	result BLOB NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (object_id, request_id)
);
CREATE INDEX ix_kv_request_created ON kv_request (created_at);
-- default kv_request.op = ''
-- default kv_request.created_at = 0.0
CREATE TABLE ledger_app (
	app_id VARCHAR NOT NULL, 
	name VARCHAR NOT NULL, 
	tags JSON, 
	ephemeral BOOLEAN NOT NULL, 
	first_seen FLOAT NOT NULL, 
	PRIMARY KEY (app_id)
);
-- default ledger_app.name = ''
-- default ledger_app.ephemeral = True
-- default ledger_app.first_seen = 0.0
CREATE TABLE ledger_hour (
	hour FLOAT NOT NULL, 
	app_id VARCHAR NOT NULL, 
	function_id VARCHAR NOT NULL, 
	gpu VARCHAR NOT NULL, 
	cloud VARCHAR NOT NULL, 
	market VARCHAR NOT NULL, 
	cost FLOAT NOT NULL, 
	seconds FLOAT NOT NULL, 
	gpu_seconds FLOAT NOT NULL, 
	idle_seconds FLOAT NOT NULL, 
	idle_cost FLOAT NOT NULL, 
	spot_cost FLOAT NOT NULL, 
	spot_on_demand_cost FLOAT NOT NULL, 
	minimum_cost FLOAT NOT NULL, 
	spans INTEGER NOT NULL, 
	CONSTRAINT pk_ledger_hour PRIMARY KEY (hour, app_id, function_id, gpu, cloud, market)
);
CREATE INDEX ix_ledger_hour_app ON ledger_hour (app_id, hour);
-- default ledger_hour.cost = 0.0
-- default ledger_hour.seconds = 0.0
-- default ledger_hour.gpu_seconds = 0.0
-- default ledger_hour.idle_seconds = 0.0
-- default ledger_hour.idle_cost = 0.0
-- default ledger_hour.spot_cost = 0.0
-- default ledger_hour.spot_on_demand_cost = 0.0
-- default ledger_hour.minimum_cost = 0.0
-- default ledger_hour.spans = 0
CREATE TABLE ledger_span (
	id INTEGER NOT NULL, 
	worker_id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	function_id VARCHAR NOT NULL, 
	provider VARCHAR NOT NULL, 
	cloud VARCHAR NOT NULL, 
	region VARCHAR NOT NULL, 
	instance_type VARCHAR NOT NULL, 
	gpu VARCHAR NOT NULL, 
	gpu_count INTEGER NOT NULL, 
	market VARCHAR NOT NULL, 
	price_per_hour FLOAT NOT NULL, 
	on_demand_per_hour FLOAT, 
	t0 FLOAT NOT NULL, 
	t1 FLOAT NOT NULL, 
	seconds FLOAT NOT NULL, 
	idle_seconds FLOAT NOT NULL, 
	cost FLOAT NOT NULL, 
	kind VARCHAR NOT NULL, 
	recorded_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_ledger_span_worker_t0_kind UNIQUE (worker_id, t0, kind)
);
CREATE INDEX ix_ledger_span_app_t0 ON ledger_span (app_id, t0);
CREATE INDEX ix_ledger_span_t0 ON ledger_span (t0);
-- default ledger_span.region = ''
-- default ledger_span.instance_type = ''
-- default ledger_span.gpu = ''
-- default ledger_span.gpu_count = 0
-- default ledger_span.market = 'on-demand'
-- default ledger_span.price_per_hour = 0.0
-- default ledger_span.t0 = 0.0
-- default ledger_span.t1 = 0.0
-- default ledger_span.seconds = 0.0
-- default ledger_span.idle_seconds = 0.0
-- default ledger_span.cost = 0.0
-- default ledger_span.kind = 'compute'
-- default ledger_span.recorded_at = 0.0
CREATE TABLE ledger_worker (
	worker_id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	function_id VARCHAR NOT NULL, 
	function_name VARCHAR NOT NULL, 
	provider VARCHAR NOT NULL, 
	cloud VARCHAR NOT NULL, 
	region VARCHAR NOT NULL, 
	instance_type VARCHAR NOT NULL, 
	gpu VARCHAR NOT NULL, 
	market VARCHAR NOT NULL, 
	price_per_hour FLOAT NOT NULL, 
	on_demand_per_hour FLOAT, 
	started_at FLOAT NOT NULL, 
	launched_at FLOAT NOT NULL, 
	last_heartbeat FLOAT, 
	stopped_at FLOAT NOT NULL, 
	stop_reason VARCHAR NOT NULL, 
	billed_seconds FLOAT NOT NULL, 
	cost FLOAT NOT NULL, 
	PRIMARY KEY (worker_id)
);
CREATE INDEX ix_ledger_worker_app ON ledger_worker (app_id, stopped_at);
-- default ledger_worker.function_name = ''
-- default ledger_worker.provider = ''
-- default ledger_worker.cloud = ''
-- default ledger_worker.region = ''
-- default ledger_worker.instance_type = ''
-- default ledger_worker.gpu = ''
-- default ledger_worker.market = ''
-- default ledger_worker.price_per_hour = 0.0
-- default ledger_worker.started_at = 0.0
-- default ledger_worker.launched_at = 0.0
-- default ledger_worker.stopped_at = 0.0
-- default ledger_worker.stop_reason = ''
-- default ledger_worker.billed_seconds = 0.0
-- default ledger_worker.cost = 0.0
CREATE TABLE log (
	id INTEGER NOT NULL, 
	app_id VARCHAR NOT NULL, 
	function_id VARCHAR, 
	worker_id VARCHAR, 
	call_id VARCHAR, 
	stream VARCHAR NOT NULL, 
	ts FLOAT NOT NULL, 
	text VARCHAR NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_log_app ON log (app_id, id);
-- default log.app_id = ''
-- default log.stream = 'stdout'
-- default log.ts = 0.0
-- default log.text = ''
CREATE TABLE output (
	id INTEGER NOT NULL, 
	input_id INTEGER NOT NULL, 
	call_id VARCHAR NOT NULL, 
	idx INTEGER NOT NULL, 
	gen_index INTEGER NOT NULL, 
	status VARCHAR NOT NULL, 
	data BLOB, 
	data_blob VARCHAR, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (input_id, gen_index)
);
CREATE INDEX ix_output_call ON output (call_id, id);
-- default output.gen_index = -1
-- default output.status = 'success'
-- default output.created_at = 0.0
CREATE TABLE pool (
	function_id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	desired INTEGER NOT NULL, 
	workers INTEGER NOT NULL, 
	reason VARCHAR NOT NULL, 
	fallen_back BOOLEAN NOT NULL, 
	market_state JSON, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (function_id)
);
CREATE INDEX ix_pool_app_id ON pool (app_id);
-- default pool.desired = 0
-- default pool.workers = 0
-- default pool.reason = ''
-- default pool.fallen_back = False
-- default pool.updated_at = 0.0
CREATE TABLE sandbox (
	id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	created_by VARCHAR NOT NULL, 
	state VARCHAR NOT NULL, 
	spec JSON NOT NULL, 
	tags JSON NOT NULL, 
	returncode INTEGER, 
	created_at FLOAT NOT NULL, 
	finished_at FLOAT, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_sandbox_app_id ON sandbox (app_id);
-- default sandbox.created_by = ''
-- default sandbox.state = 'running'
-- default sandbox.created_at = 0.0
CREATE TABLE schedule (
	function_id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	schedule JSON NOT NULL, 
	anchor FLOAT NOT NULL, 
	next_fire_at FLOAT NOT NULL, 
	last_fired_at FLOAT, 
	last_call_id VARCHAR, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (function_id)
);
CREATE INDEX ix_schedule_app_id ON schedule (app_id);
CREATE INDEX ix_schedule_due ON schedule (next_fire_at);
-- default schedule.anchor = 0.0
-- default schedule.next_fire_at = 0.0
-- default schedule.updated_at = 0.0
CREATE TABLE secret (
	id VARCHAR NOT NULL, 
	name VARCHAR NOT NULL, 
	sealed VARCHAR NOT NULL, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	created_by VARCHAR NOT NULL, 
	last_used_at FLOAT, 
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_secret_name ON secret (name);
-- default secret.sealed = ''
-- default secret.created_at = 0.0
-- default secret.updated_at = 0.0
-- default secret.created_by = ''
CREATE TABLE setting (
	"key" VARCHAR NOT NULL, 
	value VARCHAR NOT NULL, 
	PRIMARY KEY ("key")
);
-- default setting.value = ''
CREATE TABLE token (
	id VARCHAR NOT NULL, 
	name VARCHAR NOT NULL, 
	token_hash VARCHAR NOT NULL, 
	scope VARCHAR NOT NULL, 
	created_at FLOAT NOT NULL, 
	revoked BOOLEAN NOT NULL, 
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_token_token_hash ON token (token_hash);
-- default token.name = ''
-- default token.scope = 'admin'
-- default token.created_at = 0.0
-- default token.revoked = False
CREATE TABLE volume (
	id VARCHAR NOT NULL, 
	name VARCHAR, 
	ephemeral BOOLEAN NOT NULL, 
	created_at FLOAT NOT NULL, 
	created_by VARCHAR, 
	last_used_at FLOAT, 
	store_url VARCHAR NOT NULL, 
	prefix VARCHAR NOT NULL, 
	version INTEGER NOT NULL, 
	manifest VARCHAR, 
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_volume_name ON volume (name);
-- default volume.ephemeral = False
-- default volume.created_at = 0.0
-- default volume.store_url = ''
-- default volume.prefix = ''
-- default volume.version = 0
CREATE TABLE worker (
	id VARCHAR NOT NULL, 
	app_id VARCHAR NOT NULL, 
	function_id VARCHAR NOT NULL, 
	provider VARCHAR NOT NULL, 
	instance_id VARCHAR NOT NULL, 
	state VARCHAR NOT NULL, 
	function_version INTEGER NOT NULL, 
	started_at FLOAT NOT NULL, 
	ready_at FLOAT, 
	last_heartbeat FLOAT NOT NULL, 
	idle_since FLOAT, 
	in_flight INTEGER NOT NULL, 
	stopped_at FLOAT, 
	stop_reason VARCHAR, 
	offer JSON, 
	market VARCHAR NOT NULL, 
	price_per_hour FLOAT NOT NULL, 
	gpu VARCHAR, 
	host VARCHAR NOT NULL, 
	pid INTEGER, 
	handle JSON, 
	launched_at FLOAT, 
	billed_until FLOAT, 
	billing_closed BOOLEAN NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_worker_app_id ON worker (app_id);
CREATE INDEX ix_worker_function_id ON worker (function_id);
-- default worker.provider = 'local'
-- default worker.instance_id = ''
-- default worker.state = 'starting'
-- default worker.function_version = 1
-- default worker.started_at = 0.0
-- default worker.last_heartbeat = 0.0
-- default worker.in_flight = 0
-- default worker.market = 'on-demand'
-- default worker.price_per_hour = 0.0
-- default worker.host = ''
-- default worker.billing_closed = False
