#!/bin/sh
# First start of the Postgres container only (docker-entrypoint-initdb.d): Label Studio gets its own
# database on the same server, so seemly's migrations and Label Studio's never share a schema.
set -eu
psql -v ON_ERROR_STOP=1 -v db="${LABEL_STUDIO_DB:-labelstudio}" \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'EOSQL'
CREATE DATABASE :"db";
EOSQL
