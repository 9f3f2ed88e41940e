// The names the previous service and the frontend use (../shared/OLD_SYSTEM.md):
// video:getByTwitchIdPublic {twitchId}, video:updateStatusByTwitchId {twitchId, status},
// video:updateStatus {id, status}, video:updateUrls {twitchId, urls}. The writers now also take
// `secret` (see secret.test.ts); each stamps updatedAt with the deployment's clock.
import { getFunctionName } from "convex/server";
import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import {
  CREATED,
  SECRET,
  TWITCH_ID,
  allVideos,
  api,
  completedArgs,
  progressArgs,
  setup,
  videoRow,
} from "./harness.setup";

const NOW = Date.UTC(2026, 0, 15, 12, 0, 0);
// convex-test gives each transaction a strictly later timestamp than the one before, so Date.now()
// in a function may read a few milliseconds past the faked clock.
const AT_NOW = expect.closeTo(NOW, -3); // within 500 ms

beforeEach(() => {
  // Only Date is faked: the functions' Date.now() then reads NOW.
  vi.useFakeTimers({ toFake: ["Date"] });
  vi.setSystemTime(NOW);
});
afterEach(() => {
  vi.useRealTimers();
});

test("the function paths are the ones the old service and the frontend use", () => {
  expect(getFunctionName(api.video.getByTwitchIdPublic)).toBe("video:getByTwitchIdPublic");
  expect(getFunctionName(api.video.updateStatusByTwitchId)).toBe("video:updateStatusByTwitchId");
  expect(getFunctionName(api.video.updateStatus)).toBe("video:updateStatus");
  expect(getFunctionName(api.video.updateUrls)).toBe("video:updateUrls");
});

describe("getByTwitchIdPublic", () => {
  test("returns null for an unknown video and creates nothing", async () => {
    const t = setup();
    expect(await t.query(api.video.getByTwitchIdPublic, { twitchId: TWITCH_ID })).toBeNull();
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("returns the row of that video only", async () => {
    const t = setup();
    await t.mutation(
      api.video.markCompleted,
      completedArgs(CREATED + 9_000, { urls: { video_url: "https://s.test/v" } }),
    );
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED, "Queued", 0, { twitchId: "999", jobId: "j2" }),
    );
    const row = await t.query(api.video.getByTwitchIdPublic, { twitchId: TWITCH_ID });
    expect(row).toMatchObject({
      twitchId: TWITCH_ID,
      status: "Completed",
      progressPercentage: 100,
      video_url: "https://s.test/v",
    });
    expect(row).toEqual(await videoRow(t, TWITCH_ID));
  });
});

describe("updateStatusByTwitchId", () => {
  test("creates the row for an unknown video and returns its id", async () => {
    const t = setup();
    const id = await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      status: "Downloading",
    });
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    const { _creationTime, ...fields } = rows[0]!;
    expect(fields).toEqual({
      _id: id,
      twitchId: TWITCH_ID,
      status: "Downloading",
      updatedAt: AT_NOW,
    });
  });

  test("changes only the status (and updatedAt) of an existing row; any string is accepted", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 1_000, "Analyzing", 70, { title: "T" }),
    );
    const before = await videoRow(t, TWITCH_ID);
    const id = await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      status: "Generating visualizations",
    });
    expect(id).toBe(before!._id);
    expect(await videoRow(t, TWITCH_ID)).toEqual({
      ...before,
      status: "Generating visualizations",
      updatedAt: AT_NOW,
    });
  });

  test("refuses a status that is not a string", async () => {
    const t = setup();
    await expect(
      t.mutation(api.video.updateStatusByTwitchId, {
        secret: SECRET,
        twitchId: TWITCH_ID,
        // @ts-expect-error status is a string
        status: 3,
      }),
    ).rejects.toThrow(/Validator error/);
    expect(await allVideos(t)).toHaveLength(0);
  });
});

describe("updateStatus", () => {
  test("changes the status of the row with that id and returns null", async () => {
    const t = setup();
    const id = await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      status: "Queued",
    });
    const other = await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: "777",
      status: "Queued",
    });
    vi.setSystemTime(NOW + 5_000);
    expect(
      await t.mutation(api.video.updateStatus, { secret: SECRET, id, status: "Completed" }),
    ).toBeNull();
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({
      _id: id,
      status: "Completed",
      updatedAt: expect.closeTo(NOW + 5_000, -3),
    });
    expect(await videoRow(t, "777")).toMatchObject({
      _id: other,
      status: "Queued",
      updatedAt: AT_NOW,
    });
  });

  test("fails for a row that no longer exists, creating nothing", async () => {
    const t = setup();
    const id = await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      status: "Queued",
    });
    await t.run(async (ctx) => await ctx.db.delete(id));
    await expect(
      t.mutation(api.video.updateStatus, { secret: SECRET, id, status: "Completed" }),
    ).rejects.toThrow();
    expect(await allVideos(t)).toHaveLength(0);
  });

  test("refuses an id that is not a videos id", async () => {
    const t = setup();
    await expect(
      // @ts-expect-error id must be an Id<"videos">
      t.mutation(api.video.updateStatus, { secret: SECRET, id: "not-an-id", status: "Completed" }),
    ).rejects.toThrow();
  });
});

describe("updateUrls", () => {
  test("creates the row for an unknown video with the URLs", async () => {
    const t = setup();
    const urls = { chat_url: "https://s.test/c.csv", chatUrl: "https://s.test/c.csv" };
    const id = await t.mutation(api.video.updateUrls, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      urls,
    });
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    const { _creationTime, ...fields } = rows[0]!;
    expect(fields).toEqual({
      _id: id,
      twitchId: TWITCH_ID,
      status: "Queued",
      updatedAt: AT_NOW,
      ...urls,
    });
  });

  test("merges into the existing URLs, replacing only the ones given", async () => {
    const t = setup();
    await t.mutation(api.video.updateUrls, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      urls: { video_url: "https://s.test/v1", audio_url: "https://s.test/a1" },
    });
    await t.mutation(api.video.updateUrls, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      urls: { audio_url: "https://s.test/a2", waveform_url: "https://s.test/w" },
    });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({
      video_url: "https://s.test/v1",
      audio_url: "https://s.test/a2",
      waveform_url: "https://s.test/w",
      status: "Queued",
    });
  });

  test("refuses a URL field the schema does not know, writing nothing", async () => {
    const t = setup();
    await expect(
      t.mutation(api.video.updateUrls, {
        secret: SECRET,
        twitchId: TWITCH_ID,
        // @ts-expect-error highlights_url is not a URL field
        urls: { highlights_url: "https://s.test/h" },
      }),
    ).rejects.toThrow(/highlights_url/);
    expect(await allVideos(t)).toHaveLength(0);
  });
});

describe("legacy writes and job ordering", () => {
  // The legacy writers stamp updatedAt with the deployment's clock, so to the job mutations they
  // count as the newest state of the row at that moment.
  test("a job update older than a legacy write is dropped; a newer one applies", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(NOW - 10_000, "Downloading", 5, { createdAt: NOW - 20_000 }),
    );
    await t.mutation(api.video.updateStatusByTwitchId, {
      secret: SECRET,
      twitchId: TWITCH_ID,
      status: "Analyzing",
    });
    expect(
      await t.mutation(
        api.video.upsertJobProgress,
        progressArgs(NOW - 1_000, "Transcribing", 30, { createdAt: NOW - 20_000 }),
      ),
    ).toEqual({ applied: false });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({ status: "Analyzing", updatedAt: AT_NOW });
    expect(
      await t.mutation(
        api.video.upsertJobProgress,
        progressArgs(NOW + 1_000, "Transcribing", 31, { createdAt: NOW - 20_000 }),
      ),
    ).toEqual({ applied: true });
    expect(await videoRow(t, TWITCH_ID)).toMatchObject({
      status: "Transcribing",
      updatedAt: NOW + 1_000,
    });
  });
});
