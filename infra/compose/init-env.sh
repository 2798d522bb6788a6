#!/bin/sh
# Write infra/compose/.env from .env.example, filling every empty secret with a fresh random value.
# Refuses to overwrite an existing .env (delete it first to rotate everything; rotating the Postgres
# or MinIO passwords of existing volumes also needs ALTER ROLE / mc admin user on the servers).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target="$here/.env"
if [ -e "$target" ]; then
  echo "$target exists; not overwriting it" >&2
  exit 1
fi
# hex: URL-safe (the Postgres password goes into SEEMLY_DATABASE_URL).
random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in
    LABEL_STUDIO_USER_TOKEN=) echo "LABEL_STUDIO_USER_TOKEN=$(random_hex 20)" ;;
    POSTGRES_PASSWORD=|MINIO_ROOT_PASSWORD=|SEEMLY_S3_SECRET_ACCESS_KEY=|LABEL_STUDIO_PASSWORD=|SEEMLY_BACKEND_BASIC_AUTH_PASSWORD=)
      echo "${line}$(random_hex 24)" ;;
    *) echo "$line" ;;
  esac
done < "$here/.env.example" > "$target"
echo "wrote $target (mode 600); the Label Studio login is in it (LABEL_STUDIO_USERNAME / _PASSWORD)"
