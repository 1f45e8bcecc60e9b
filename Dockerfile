# Airflow image for docker-compose.yaml: the official image plus this project's pinned
# runtime dependencies and code.
FROM apache/airflow:3.3.2-python3.11

# The official image expects extra packages to be installed by the airflow user, not root.
USER airflow

# requirements.lock pins every transitive version (the published Airflow constraint files
# are not used), so the image resolves to the same set as the local virtualenv.
COPY --chown=airflow:0 requirements.txt requirements.lock /tmp/lead-sync/
RUN pip install --no-cache-dir -r /tmp/lead-sync/requirements.txt -c /tmp/lead-sync/requirements.lock

# Baked in so the image runs on its own; docker-compose.yaml mounts the checkout over these.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/

# Only dags/ and plugins/ are on Airflow's import path; this makes the lead_sync core and the
# cutmeshort_sandbox packages importable in the image (local runs use an editable install).
ENV PYTHONPATH=/opt/airflow/include
