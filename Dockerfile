# Airflow image for docker-compose.yaml: the official image plus this project's pinned
# runtime dependencies and code.
FROM apache/airflow:3.3.2-python3.11

# The official image expects extra packages to be installed by the airflow user, not root.
USER airflow

# requirements.lock pins every package, transitive ones included (the published Airflow
# constraint files are not used). It is installed as it is, with --no-deps: pip resolves
# nothing, and each package the lock names gets the version the local virtualenv and the
# tests run with. The lock also pins the few test-only packages (pytest and the like).
COPY --chown=airflow:0 requirements.lock /tmp/lead-sync/
RUN pip install --no-cache-dir --no-deps -r /tmp/lead-sync/requirements.lock

# Baked in so the image runs on its own; docker-compose.yaml mounts the checkout over these.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/

# Only dags/ and plugins/ are on Airflow's import path; this makes the lead_sync core and the
# cutmeshort_sandbox packages importable in the image (local runs use an editable install).
ENV PYTHONPATH=/opt/airflow/include
