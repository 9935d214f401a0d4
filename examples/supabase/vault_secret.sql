-- Store the embeddings API key in Supabase Vault once (SQL editor, as postgres),
-- then run autoembed with --api-key-vault-secret openai_api_key (or
-- AUTOEMBED_API_KEY_VAULT_SECRET=openai_api_key): no key on the cron host.
SELECT vault.create_secret('sk-replace-me', 'openai_api_key', 'API key for autoembed');

-- To rotate it later:
-- SELECT vault.update_secret((SELECT id FROM vault.secrets WHERE name = 'openai_api_key'), 'sk-new-key');
