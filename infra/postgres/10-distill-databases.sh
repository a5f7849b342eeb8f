#!/bin/sh
# Creates the databases of the distill stack, owned by $POSTGRES_USER: `mlflow` (MLflow
# tracking + model registry) and `prefect` (Prefect server). Idempotent: a database that
# exists is left alone.
#
# infra/docker-compose.yml mounts this file into /docker-entrypoint-initdb.d/ of the official
# postgres image, whose entrypoint runs it once, when the data volume is empty (it executes
# the file when it is executable and sources it otherwise, so this script sets no shell
# options and exits only on failure). To run it again on an existing volume:
#
#   docker compose -f infra/docker-compose.yml exec postgres sh /docker-entrypoint-initdb.d/10-distill-databases.sh
#
# Connection: psql's defaults and PG* variables (in the container: the local socket).
# DISTILL_DATABASES overrides the list of databases.

distill_create_databases() {
    for distill_db in ${DISTILL_DATABASES:-mlflow prefect}; do
        psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname postgres \
            -v db="$distill_db" -v owner="$POSTGRES_USER" <<'SQL' || return 1
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')
\gexec
SQL
        echo "distill: database $distill_db is ready"
    done
}

# `return` when sourced by the image's entrypoint, `exit` when executed: either way a failure
# stops the container's first start instead of leaving a database missing.
distill_create_databases || { echo "distill: creating the databases failed" >&2; return 1 2>/dev/null || exit 1; }
