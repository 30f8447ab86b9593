"""Schema migrations. Append a new list of statements for every change; never edit an old one.

Columns hold what is queried or changed on its own (state, owners, timers); the rest of a
resource's configuration sits in a JSON `config` column exactly as the API received it.
Timestamps are epoch seconds (REAL: an 8-byte float on both backends, see postgres.py `ddl`).
Statements are written once for SQLite and PostgreSQL alike.
"""

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE images (
            arn TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            region TEXT NOT NULL,
            name TEXT NOT NULL,
            id TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            next_version INTEGER NOT NULL,
            tags TEXT NOT NULL DEFAULT '{}',
            UNIQUE (account, region, name)
        )""",
        """CREATE TABLE versions (
            image_arn TEXT NOT NULL REFERENCES images(arn) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            state TEXT NOT NULL,
            status TEXT NOT NULL,
            state_reason TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            config TEXT NOT NULL,
            PRIMARY KEY (image_arn, number)
        )""",
        """CREATE TABLE builds (
            build_id TEXT PRIMARY KEY,
            image_arn TEXT NOT NULL,
            version_number INTEGER NOT NULL,
            architecture TEXT NOT NULL,
            chipset TEXT NOT NULL,
            chipset_generation TEXT NOT NULL,
            state TEXT NOT NULL,
            state_reason TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            -- where the builder put the rootfs and snapshot, the image config, snapshot sizes
            artifacts TEXT,
            FOREIGN KEY (image_arn, version_number) REFERENCES versions(image_arn, number) ON DELETE CASCADE
        )""",
        "CREATE INDEX builds_by_version ON builds (image_arn, version_number)",
        "CREATE INDEX images_by_owner ON images (account, region, created_at, arn)",
        """CREATE TABLE microvms (
            id TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            region TEXT NOT NULL,
            image_arn TEXT NOT NULL,
            image_version TEXT NOT NULL,
            state TEXT NOT NULL,
            state_reason TEXT,
            endpoint TEXT NOT NULL UNIQUE,
            memory_mib INTEGER NOT NULL,
            started_at REAL NOT NULL,
            terminated_at REAL,
            -- timers, persisted so that they survive a restart and fire once
            deadline_at REAL NOT NULL,
            last_activity_at REAL NOT NULL,
            suspended_at REAL,
            -- the idle policy, NULL without one
            max_idle_seconds REAL,
            suspended_ttl_seconds REAL,
            auto_resume INTEGER NOT NULL DEFAULT 0,
            config TEXT NOT NULL
        )""",
        "CREATE INDEX microvms_by_owner ON microvms (account, region, started_at, id)",
        "CREATE INDEX microvms_by_image ON microvms (image_arn, state)",
        """CREATE TABLE client_tokens (
            account TEXT NOT NULL,
            region TEXT NOT NULL,
            operation TEXT NOT NULL,
            token TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            response TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (account, region, operation, token)
        )""",
    ],
    [
        # The state machine (openmicrovm/states.py): a resume is a state of its own, not PENDING
        # plus suspended_at; every state change is stamped; images record why they moved.
        "ALTER TABLE images ADD COLUMN state_reason TEXT",
        "ALTER TABLE microvms ADD COLUMN state_changed_at REAL",
        "UPDATE microvms SET state_changed_at = COALESCE(terminated_at, suspended_at, started_at)",
        "UPDATE microvms SET state = 'RESUMING' WHERE state = 'PENDING' AND suspended_at IS NOT NULL",
        # An image's latest active and failed versions, kept by the versions repository on every
        # change, so that listing images reads one table.
        "ALTER TABLE images ADD COLUMN latest_active_version INTEGER",
        "ALTER TABLE images ADD COLUMN latest_failed_version INTEGER",
        """UPDATE images SET
            latest_active_version = (SELECT MAX(number) FROM versions v WHERE v.image_arn = images.arn
                                      AND v.state = 'SUCCESSFUL' AND v.status = 'ACTIVE'),
            latest_failed_version = (SELECT MAX(number) FROM versions v WHERE v.image_arn = images.arn
                                      AND v.state = 'FAILED')""",
        # The timers and start-up look for MicroVMs and builds by state.
        "CREATE INDEX microvms_by_state ON microvms (state)",
        "CREATE INDEX builds_by_state ON builds (state)",
        # Endpoint token keys, shared by every server of the database (they were a file before).
        """CREATE TABLE token_keys (
            kid TEXT PRIMARY KEY,
            secret TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ],
    [
        # Many hosts: host agents hold leases; MicroVMs and builds belong to one host each (NULL:
        # rows written before hosts existed, which the one-host server adopts as its own).
        """CREATE TABLE hosts (
            id TEXT PRIMARY KEY,
            advertise_url TEXT NOT NULL,
            architecture TEXT NOT NULL,
            state TEXT NOT NULL,
            state_reason TEXT,
            -- memory MicroVMs may still take (RAM available less the reserve) at the last heartbeat
            available_mib INTEGER NOT NULL,
            build_slots INTEGER NOT NULL,
            registered_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            lease_expires_at REAL NOT NULL,
            -- counts registrations: a host that was lost comes back as a new incarnation
            incarnation INTEGER NOT NULL
        )""",
        "ALTER TABLE microvms ADD COLUMN host_id TEXT",
        # Memory admitted for a start (runtime/host.py MemoryGate), counted against its host until RUNNING.
        "ALTER TABLE microvms ADD COLUMN admission_mib INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX microvms_by_host ON microvms (host_id, state)",
        "ALTER TABLE builds ADD COLUMN host_id TEXT",
        # Which hosts hold which version's outputs on their disk (placement prefers them).
        """CREATE TABLE host_versions (
            host_id TEXT NOT NULL,
            image_arn TEXT NOT NULL,
            version_number INTEGER NOT NULL,
            PRIMARY KEY (host_id, image_arn, version_number)
        )""",
        # Work one replica does for all (the timers, noticing lost hosts): one holder at a time.
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            expires_at REAL NOT NULL
        )""",
    ],
]
