"""The database: schema and migrations, connections, writing a job's rows, queries and exports."""
