// The videos table's schema (schema.ts) is enforced on every write, and the functions' argument
// validators refuse malformed calls before any handler runs.
import { describe, expect, test } from "vitest";
import {
  CREATED,
  SECRET,
  TWITCH_ID,
  allVideos,
  api,
  completedArgs,
  progressArgs,
  setup,
} from "./harness.setup";

describe("schema validation of documents", () => {
  test("a document matching the schema is stored", async () => {
    const t = setup();
    await t.run(async (ctx) => {
      await ctx.db.insert("videos", {
        twitchId: TWITCH_ID,
        status: "Queued",
        title: "A stream",
        progressPercentage: 12.5,
        isRetryable: false,
        transcript_url: "https://example.test/t.csv",
        transcriptUrl: "https://example.test/t.csv",
      });
    });
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      twitchId: TWITCH_ID,
      status: "Queued",
      progressPercentage: 12.5,
    });
  });

  test("a field of the wrong type is rejected", async () => {
    const t = setup();
    await expect(
      t.run(async (ctx) => {
        // @ts-expect-error twitchId is a string in the schema
        await ctx.db.insert("videos", { twitchId: 2345678901, status: "Queued" });
      }),
    ).rejects.toThrow(/Validator error: Expected `string`, got `2345678901`/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a job field of the wrong type is rejected", async () => {
    const t = setup();
    await expect(
      t.run(async (ctx) => {
        await ctx.db.insert("videos", {
          twitchId: TWITCH_ID,
          status: "Queued",
          // @ts-expect-error progressPercentage is a number in the schema
          progressPercentage: "50",
        });
      }),
    ).rejects.toThrow(/Validator error: Expected `number`, got `50`/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a missing required field is rejected", async () => {
    const t = setup();
    await expect(
      t.run(async (ctx) => {
        // @ts-expect-error status is required
        await ctx.db.insert("videos", { twitchId: TWITCH_ID });
      }),
    ).rejects.toThrow(/status/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a field the schema does not declare is rejected", async () => {
    const t = setup();
    await expect(
      t.run(async (ctx) => {
        // @ts-expect-error highlights is not a column of videos
        await ctx.db.insert("videos", { twitchId: TWITCH_ID, status: "Queued", highlights: [] });
      }),
    ).rejects.toThrow(/highlights/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a patch that breaks the schema is rejected and leaves the row as it was", async () => {
    const t = setup();
    const id = await t.run(
      async (ctx) => await ctx.db.insert("videos", { twitchId: TWITCH_ID, status: "Queued" }),
    );
    await expect(
      t.run(async (ctx) => {
        // @ts-expect-error isRetryable is a boolean in the schema
        await ctx.db.patch(id, { isRetryable: "yes" });
      }),
    ).rejects.toThrow(/Validator error: Expected `boolean`, got `yes`/);
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    expect(rows[0]).not.toHaveProperty("isRetryable");
  });
});

describe("argument validation of the job mutations", () => {
  test("a status outside the display strings is refused", async () => {
    const t = setup();
    await expect(
      t.mutation(api.video.upsertJobProgress, {
        ...progressArgs(CREATED + 1, "Downloading", 10),
        // @ts-expect-error not one of the display statuses
        status: "downloading",
      }),
    ).rejects.toThrow(/Validator error: Expected one of literal.*got `"downloading"`/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a number sent as a string is refused", async () => {
    const t = setup();
    await expect(
      t.mutation(api.video.upsertJobProgress, {
        ...progressArgs(CREATED + 1, "Downloading", 10),
        // @ts-expect-error progressPercentage must be a number
        progressPercentage: "10",
      }),
    ).rejects.toThrow(/Validator error: Expected `number`, got `10`/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("an unknown URL field is refused", async () => {
    const t = setup();
    await expect(
      t.mutation(api.video.markCompleted, {
        ...completedArgs(CREATED + 5),
        urls: {
          video_url: "https://example.test/v.mp4",
          // @ts-expect-error only the schema's URL fields are accepted
          thumbnail_url: "https://example.test/t.png",
        },
      }),
    ).rejects.toThrow(/thumbnail_url/);
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a missing required argument is refused", async () => {
    const t = setup();
    const { processingCompletedAt: _dropped, ...args } = completedArgs(CREATED + 5);
    // @ts-expect-error processingCompletedAt is required
    await expect(t.mutation(api.video.markCompleted, args)).rejects.toThrow(
      /processingCompletedAt/,
    );
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("a well-formed call is accepted (control for the refusals above)", async () => {
    const t = setup();
    await expect(
      t.mutation(api.video.upsertJobProgress, {
        ...progressArgs(CREATED + 1, "Downloading", 10),
        secret: SECRET,
      }),
    ).resolves.toEqual({ applied: true });
    expect(await allVideos(t)).toHaveLength(1);
  });
});
