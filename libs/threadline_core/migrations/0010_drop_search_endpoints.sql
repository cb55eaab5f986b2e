-- Search no longer goes over HTTP: the gateway asks the ingestion service over Kafka
-- (threadline.search.requests / threadline.search.replies), so instances no longer register a URL.
DROP TABLE IF EXISTS search_endpoints;
