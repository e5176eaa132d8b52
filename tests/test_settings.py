"""Settings: typed parsing, errors that name the variable, production refusals, and README coverage."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from settings import DEFAULT_MODEL_PRICES, ConfigError, Settings

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_run_the_embedded_service() -> None:
    settings = Settings.from_environ({})
    assert (settings.environment, settings.store, settings.llm_provider) == ("development", "sqlite", "local")
    assert settings.max_retry_attempts == 3


def test_values_are_cast_to_their_types() -> None:
    settings = Settings.from_environ(
        {"API_PORT": "9000", "RETRY_BASE_DELAY": "0.25", "CORS_ORIGINS": "https://a.example, https://b.example",
         "LLM_PROVIDER": "Bedrock", "LOG_LEVEL": "debug"}
    )
    assert settings.api_port == 9000 and settings.retry_base_delay == 0.25
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.llm_provider == "bedrock" and settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"API_PORT": "eighty"}, "API_PORT"),
        ({"API_PORT": "70000"}, "API_PORT"),
        ({"LLM_PROVIDER": "openai"}, "LLM_PROVIDER"),
        ({"STORE": "mongo"}, "STORE"),
        ({"MAX_RETRY_ATTEMPTS": "0"}, "MAX_RETRY_ATTEMPTS"),
        ({"RETRY_BASE_DELAY": "2", "RETRY_MAX_DELAY": "1"}, "RETRY_MAX_DELAY"),
        ({"CORS_ORIGINS": "*,https://a.example"}, "CORS_ORIGINS"),
        ({"ENVIRONMENT": "staging"}, "ENVIRONMENT"),
        ({"HEADER_READ_TIMEOUT": "0"}, "HEADER_READ_TIMEOUT"),
        ({"MAX_CONNECTIONS": "50", "MAX_CONNECTIONS_PER_ADDRESS": "50"}, "MAX_CONNECTIONS_PER_ADDRESS"),
        ({"AUTH_LOOKUPS_PER_MINUTE": "0"}, "AUTH_LOOKUPS_PER_MINUTE"),
        ({"AUTH_LOOKUP_CONCURRENCY": "0"}, "AUTH_LOOKUP_CONCURRENCY"),
        ({"BEDROCK_FALLBACK_MODEL_IDS": "amazon.nova-micro-v1:0 us.amazon.nova-lite-v1:0"}, "BEDROCK_FALLBACK_MODEL_IDS"),
        ({"BEDROCK_FALLBACK_MODEL_IDS": "amazon.nova-micro-v1:0,amazon.nova-micro-v1:0"}, "BEDROCK_FALLBACK_MODEL_IDS"),
        ({"BEDROCK_FALLBACK_MODEL_IDS": "amazon.nova-micro-v1:0,amazon.nova-lite-v1:0"}, "BEDROCK_FALLBACK_MODEL_IDS"),
        ({"BEDROCK_FALLBACK_MODEL_IDS": ",".join(f"m.model-{i}" for i in range(6))}, "BEDROCK_FALLBACK_MODEL_IDS"),
        ({"SUPABASE_POOL_SIZE": "0"}, "SUPABASE_POOL_SIZE"),
        ({"SUPABASE_POOL_TIMEOUT": "0"}, "SUPABASE_POOL_TIMEOUT"),
        ({"MODEL_PRICES": "{not json"}, "MODEL_PRICES"),
        ({"MODEL_PRICES": '["amazon.nova-lite-v1:0"]'}, "MODEL_PRICES"),
        ({"MODEL_PRICES": '{"m.x": {"input": 1}}'}, "MODEL_PRICES"),  # no output price
        ({"MODEL_PRICES": '{"m.x": {"input": -1, "output": 1}}'}, "MODEL_PRICES"),
        ({"MODEL_PRICES": '{"m.x": {"input": 1, "output": 1, "cache": 1}}'}, "MODEL_PRICES"),
        ({"MODEL_PRICES": '{"m x": {"input": 1, "output": 1}}'}, "MODEL_PRICES"),
        ({"BUDGET_DAY_TOKENS": "-1"}, "BUDGET_DAY_TOKENS"),
        ({"BUDGET_MONTH_COST": "ten"}, "BUDGET_MONTH_COST"),
        # A cost budget needs a price for every model a turn may use, fallbacks included.
        ({"BUDGET_DAY_COST": "1", "LLM_PROVIDER": "bedrock", "BEDROCK_FALLBACK_MODEL_IDS": "m.unpriced"},
         "m.unpriced to MODEL_PRICES"),
    ],
)
def test_invalid_values_stop_startup_naming_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_environ(environ)


def test_fallback_models_are_read_in_order() -> None:
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.amazon.nova-micro-v1:0"
    settings = Settings.from_environ({"BEDROCK_FALLBACK_MODEL_IDS": f" us.amazon.nova-lite-v1:0 , {arn}"})
    assert settings.bedrock_fallback_model_ids == ("us.amazon.nova-lite-v1:0", arn)
    assert Settings.from_environ({}).bedrock_fallback_model_ids == ()


def test_model_prices_merge_over_the_shipped_ones() -> None:
    shipped = Settings()
    assert shipped.model_prices["canvalo-local-responder"].output == 0
    assert (shipped.model_prices["us.amazon.nova-lite-v1:0"].input, shipped.model_prices["amazon.nova-lite-v1:0"].output) \
        == (0.06, 0.24)
    # .env.example's example fallback is priced too, so uncommenting it beside a cost budget still starts.
    assert (shipped.model_prices["eu.amazon.nova-micro-v1:0"].input, shipped.model_prices["amazon.nova-micro-v1:0"].output) \
        == (0.035, 0.14)
    settings = Settings.from_environ({"MODEL_PRICES": '{"m.x": {"input": 2, "output": 8, "cache_read": 0.2}, '
                                                      '"amazon.nova-lite-v1:0": {"input": 0.1, "output": 0.3}}',
                                      "BUDGET_MONTH_COST": "5", "LLM_PROVIDER": "bedrock",
                                      "BEDROCK_FALLBACK_MODEL_IDS": "m.x"})
    assert (settings.model_prices["m.x"].cache_read, settings.model_prices["m.x"].cache_write) == (0.2, None)
    assert settings.model_prices["amazon.nova-lite-v1:0"].input == 0.1  # overridden
    assert settings.model_prices["us.amazon.nova-lite-v1:0"].input == 0.06  # the rest kept
    # The embedded default's responder is priced (free): a cost budget starts without any MODEL_PRICES.
    assert Settings.from_environ({"BUDGET_DAY_COST": "1"}).budget_day_cost == 1


def test_production_refuses_to_start_without_auth() -> None:
    with pytest.raises(ConfigError, match="SUPABASE_JWT_SECRET"):
        Settings.from_environ({"ENVIRONMENT": "production"})


def test_production_with_supabase_names_each_missing_piece() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({"ENVIRONMENT": "production", "STORE": "supabase", "SUPABASE_JWT_SECRET": "s" * 32})
    assert "SUPABASE_URL" in str(caught.value) and "SUPABASE_PUBLISHABLE_KEY" in str(caught.value)


def test_secrets_never_appear_in_repr_or_errors() -> None:
    settings = Settings.from_environ({"SUPABASE_JWT_SECRET": "super-secret-value-123"})
    assert "super-secret-value-123" not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({"SUPABASE_JWT_SECRET": "super-secret-value-123", "API_PORT": "x"})
    assert "super-secret-value-123" not in str(caught.value)


def test_readme_documents_every_setting() -> None:
    readme = README.read_text()
    missing = [f.name.upper() for f in dataclasses.fields(Settings) if f"`{f.name.upper()}`" not in readme]
    assert missing == []


def test_every_model_the_example_environment_names_has_a_shipped_price() -> None:
    """.env.example's model and its example fallbacks start beside a cost budget with no MODEL_PRICES of their own."""
    example = (README.parent / ".env.example").read_text()
    named = re.findall(r"^#? ?BEDROCK_(?:MODEL_ID|FALLBACK_MODEL_IDS)=(\S+)$", example, re.M)
    models = [model for value in named for model in value.split(",")]
    assert "amazon.nova-lite-v1:0" in models and len(models) >= 2
    environ = {"LLM_PROVIDER": "bedrock", "BUDGET_DAY_COST": "1", "BEDROCK_MODEL_ID": models[0],
               "BEDROCK_FALLBACK_MODEL_IDS": ",".join(models[1:])}
    Settings.from_environ(environ).validate()  # a model without a price is a ConfigError naming it


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BEDROCK_CONNECT_TIMEOUT", "-5"), ("BEDROCK_FIRST_EVENT_TIMEOUT", "0"), ("BEDROCK_IDLE_TIMEOUT", "nan"),
     ("BEDROCK_IDLE_TIMEOUT", "301"), ("SHUTDOWN_GRACE_SECONDS", "inf"), ("SHUTDOWN_GRACE_SECONDS", "-1"),
     ("RUN_EVENTS_TTL", "inf"), ("RUN_EVENTS_TTL", "-1"), ("SUPABASE_TIMEOUT", "inf"), ("SUPABASE_TIMEOUT", "0"),
     ("RETRY_MAX_TOTAL", "nan"), ("BUDGET_DAY_COST", "inf"), ("LOCAL_TOKEN_DELAY", "-inf")],
)
def test_every_number_is_finite_and_in_its_documented_range(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_environ({"LLM_PROVIDER": "bedrock", variable: value})


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/", "https://app.example.com/x", "//a"])
def test_cors_origins_must_be_spelt_as_browsers_send_them(origin: str) -> None:
    with pytest.raises(ConfigError, match="CORS_ORIGINS must be"):
        Settings.from_environ({"CORS_ORIGINS": f"https://ok.example.com,{origin}"})


def test_cors_origins_as_browsers_send_them_are_accepted() -> None:
    origins = "https://app.example.com,http://localhost:5173,http://[::1]:3000,capacitor://localhost"
    assert len(Settings.from_environ({"CORS_ORIGINS": origins}).cors_origins) == 4


def test_the_example_environment_names_every_shipped_price() -> None:
    """.env.example lists the shipped prices a cost budget merges MODEL_PRICES over; a model left out looks unpriced."""
    example = " ".join((README.parent / ".env.example").read_text().replace("#", " ").split())
    base_models = {model.split("amazon.", 1)[1] for model in DEFAULT_MODEL_PRICES if "amazon." in model}
    for model in base_models:  # nova-micro-v1:0 -> "Nova Micro"
        assert f"Nova {model.split('-')[1].capitalize()}" in example, model
